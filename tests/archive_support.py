"""Test doubles of the archive tests: a content-hash model and a PNG-only reader.

``FakeModel`` maps identical arrays to identical unit vectors and different arrays to (almost
surely) different ones, so catalogue/index/search logic can be checked exactly without a
network; ``load`` reads PNG files only and raises the library's errors otherwise. The real
reader and the tiny random model are exercised by the integration tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from m3bind.errors import CorruptFile, UnsupportedFormat
from m3bind.io.sample import Sample


def vector_of(data: bytes, dim: int) -> np.ndarray:
    """A deterministic unit vector from bytes."""
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeModel:
    """``embed``/``embed_text``/``model_id`` like a BoundModel; vectors are content hashes."""

    def __init__(self, dim: int = 8, model_id: str = "fake-0001"):
        self.dim = dim
        self.model_id = model_id
        self.logit_scale = 10.0
        self.modalities = ["cxr", "ct", "retina", "ecg", "pathology", "mri"]
        self.calls = 0

    def embed(self, samples, batch_size: int = 32) -> np.ndarray:
        samples = samples if isinstance(samples, list) else [samples]
        self.calls += len(samples)
        return np.stack([vector_of(np.ascontiguousarray(s.array).tobytes(), self.dim)
                         for s in samples])

    def embed_text(self, texts, modality=None) -> np.ndarray:
        return np.stack([vector_of(t.encode(), self.dim) for t in texts])


def load(path, modality=None, *, keep_phi: bool = False) -> Sample:
    """Read a PNG (grey or RGB) as a Sample; anything else is an error."""
    from PIL import Image

    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(8)
    if head != b"\x89PNG\r\n\x1a\n":
        raise UnsupportedFormat("not a PNG", str(p))
    try:
        with Image.open(p) as im:
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise CorruptFile(f"damaged PNG: {e}", str(p)) from None
    return Sample(array=arr, modality=modality, format="png", path=str(p),
                  modality_guess=modality is None)


def write_png(path: Path, seed: int, size: int = 16, rgb: bool = False) -> Path:
    """A small random PNG (distinct per seed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


class SlowFakeModel(FakeModel):
    """A FakeModel that sleeps per embedded batch (to interrupt or overlap an indexing run)."""

    def __init__(self, delay: float = 0.05, **kw):
        super().__init__(**kw)
        self.delay = delay

    def embed(self, samples, batch_size: int = 32):
        import time

        time.sleep(self.delay)
        return super().embed(samples, batch_size)


# --- the tiny random model of m3bind.testing, built once per test session ----------------------
def tiny_model_dir(base: Path) -> Path:
    """``m3bind.testing.build_tiny_model`` under ``base`` (built once, reused by later calls)."""
    import fcntl

    out = base / "m3bind-tiny-model"
    with open(base / "m3bind-tiny-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            from m3bind.testing import build_tiny_model

            build_tiny_model(out)
    return out


# --- a throwaway PostgreSQL server (Debian's postgresql) -----------------------------------
_PG: dict = {}


def _pg_bin() -> Path | None:
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_server() -> str | None:
    """Base URL (without database) of a session-wide throwaway PostgreSQL server, or None.

    ``M3BIND_TEST_POSTGRES_URL`` points at an existing server instead. Otherwise ``initdb`` and
    ``pg_ctl`` from Debian's postgresql run in a temporary folder on a free port; initdb refuses
    to run as root, so as root they run as the ``postgres`` system user (via ``runuser``).
    The server is stopped at interpreter exit.
    """
    import atexit
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    if "url" in _PG:
        return _PG["url"]
    env_url = os.environ.get("M3BIND_TEST_POSTGRES_URL")
    if env_url:
        _PG["url"] = env_url.rstrip("/")
        return _PG["url"]
    bindir = _pg_bin()
    _PG["url"] = None
    if bindir is None:
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            return None
        runuser = shutil.which("runuser") or shutil.which("su")
        if runuser is None:
            return None
        prefix = [runuser, "-u", "postgres", "--"] if runuser.endswith("runuser") else None
        if prefix is None:
            return None
    tmp = Path(tempfile.mkdtemp(prefix="m3bind-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    if owner is not None:
        for p in (tmp, sock):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60",
                                 "-l", str(tmp / "log"), "-o",
                                 (f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
                                  " -c full_page_writes=off -c synchronous_commit=off"),
                                 "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as e:
        import logging

        logging.getLogger(__name__).warning("cannot start PostgreSQL: %s", e)
        shutil.rmtree(tmp, ignore_errors=True)
        return None

    def stop() -> None:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                 "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(stop)
    _PG["url"] = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    return _PG["url"]


def fresh_postgres_db(name: str) -> str | None:
    """URL of a new, empty database on the throwaway server (None when there is none)."""
    import re
    import uuid

    import psycopg

    base = postgres_server()
    if base is None:
        return None
    db = re.sub(r"\W", "_", name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    return f"{base}/{db}"


def catalog_url(backend: str, tmp_path: Path, name: str) -> str:
    """A fresh catalogue URL of ``backend`` (``sqlite`` or ``postgres``); skips without a server."""
    import pytest

    if backend == "sqlite":
        return str(tmp_path / "catalog.db")
    url = fresh_postgres_db(name)
    if url is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    return url


# --- a small mixed archive in real formats ------------------------------------------------------
def write_dicom_series(folder: Path, n: int, patient: str, study_uid: str, series_uid: str,
                       date: str, name: str = "Doe^Jane", birth: str = "19600101") -> Path:
    """``n`` CT slices (from pydicom's ``CT_small.dcm``) of one series with the given links."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm", download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient, name, birth
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study_uid, series_uid, date
        ds.SOPInstanceUID = f"{series_uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * i]
        ds.SliceLocation = -75.0 + 5.0 * i
        ds.save_as(folder / f"slice{i:03d}.dcm")
    return folder


def write_wfdb(folder: Path, record: str, seed: int, comments: list[str]) -> Path:
    """A 12-lead, 10 s, 100 Hz WFDB record with header comments."""
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sig = (0.1 * rng.normal(size=(1000, 12))).astype(np.float64)
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    wfdb.wrsamp(record, fs=100, units=["mV"] * 12, sig_name=leads, p_signal=sig,
                fmt=["16"] * 12, comments=comments, write_dir=str(folder))
    return folder / f"{record}.hea"


def write_nifti(path: Path, seed: int, shape=(8, 10, 6)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def make_archive(root: Path) -> Path:
    """A mixed archive: PNG CXRs (sidecar-linked), a fundus PNG, a CT DICOM series, a WFDB
    ECG (header-linked), an MRI study folder — patient ``PAT-1`` has a CT, an ECG and a CXR."""
    for i in range(3):
        write_png(root / "cxr" / f"p{i}.png", i, size=32)
    write_png(root / "fundus" / "eye.png", 10, size=32, rgb=True)
    write_dicom_series(root / "ct" / "series1", 3, "PAT-1", "1.2.3.4", "1.2.3.4.5", "20240105")
    write_wfdb(root / "ecg", "rec1", 0, ["patient: PAT-1", "study: ECG-7", "study_date: 2024-01-07"])
    write_wfdb(root / "ecg", "rec2", 1, ["patient: PAT-2", "study_date: 2024-03-01"])
    for seq in ("t1", "flair"):
        write_nifti(root / "mri" / "s1" / f"{seq}.nii.gz", hash(seq) % 100)
    (root / "m3bind_sidecar.csv").write_text(
        "path,patient,study,date,modality\n"
        "cxr/p0.png,PAT-1,CXR-1,2024-01-06,cxr\n"
        "cxr/p1.png,PAT-1,CXR-2,2024-02-20,cxr\n"
        "cxr/p2.png,PAT-2,,2024-03-02,cxr\n")
    return root


def crashing_load(path, modality=None, *, keep_phi: bool = False) -> Sample:
    """:func:`load`, except that a file named ``crash*`` kills its process (a codec segfault)."""
    import os
    import signal

    if Path(path).name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    return load(path, modality, keep_phi=keep_phi)
