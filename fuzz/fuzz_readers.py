"""Mutation fuzzer for the readers of :mod:`m3bind.io`, seeded from real sample files.

Each execution takes a seed (:mod:`fuzz.seeds`), applies one to three structure-aware
mutations (:mod:`fuzz.mutators`: byte flips, truncations, integer splices, DICOM tag
mutations through pydicom, NIfTI header fields, WFDB header fields including ``../`` file
names, PNG/JPEG chunk and segment fields, TIFF IFD entries and Aperio descriptions), writes
the result to a scratch folder and calls :func:`m3bind.io.load` on it in a worker process.

A worker process is forked once and runs case after case (files in ``/dev/shm``); it is
replaced only after a crash, a hang or a memory error. It loads every seed once unmutated
before the cap is set (lazy imports, decoder plugins), then runs under an address-space cap
(``RLIMIT_AS``: its size after the warm-up plus ``--mem-mb``) with the reader limits tightened
(:data:`WORKER_LIMITS`), so an allocation the limits did not bound shows up as a
``MemoryError``. The per-file time limit counts CPU time, not wall time, so that it means the
same on a loaded machine: a soft limit (``ITIMER_PROF``/SIGPROF) reports where Python code was
stuck; a hard one (the parent reads the worker's CPU time from ``/proc`` and kills it 5 s past
the limit, or after a wall-clock backstop) catches hangs inside C code. Outcomes per execution:

* ``ok`` - a Sample came back and passed the invariants (ndarray, non-empty, finite);
* ``rejected`` - an :class:`~m3bind.errors.M3BindError` (the intended answer to bad input);
* ``finding`` - any other exception, or a Sample breaking an invariant;
* ``memory`` - a MemoryError under the cap (even if converted into an M3BindError);
* ``hang`` - past the per-file CPU-time limit;
* ``crash`` - the worker process died (a signal in C code).

Example::

    nice -n 19 python -m fuzz.fuzz_readers --reader dicom --execs 100000 --workers 1 \\
        --out benchmarks/results/fuzz_dicom.json --resume

With ``--resume`` a run continues the counts (and case numbers) of an existing ``--out``,
so 10^5 executions can be done in chunks.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import platform
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fuzz import mutators as mu

log = logging.getLogger("fuzz")

READERS = ("dicom", "nifti", "wfdb", "photo", "slide")
#: Version of the case generation recorded with each chunk: 2 changed the slide and NIfTI seeds
#: (smaller derivatives), so cases numbered in harness-1 chunks replay with that version's code.
HARNESS = 2
#: Reader limits inside the worker: tight enough that a bounded decode fits under the RSS cap.
WORKER_LIMITS = {"max_file_bytes": 64 * 2**20, "max_pixels": 2**24, "max_signal_values": 5_000_000,
                 "max_tiles": 16}
TS_UIDS = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
           "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
           "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
           "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
           "1.2.840.10008.1.2.4.201", "1.2.3", "")
DICOM_TAGS = {
    "Rows": (0, 1, 2, 3, 255, 4096, 65535), "Columns": (0, 1, 2, 3, 255, 4096, 65535),
    "BitsAllocated": (0, 1, 7, 8, 12, 16, 24, 32, 64, 65535), "BitsStored": (0, 1, 8, 12, 16, 17, 32, 64),
    "HighBit": (0, 7, 11, 15, 31, 63), "PixelRepresentation": (0, 1, 2, 65535),
    "SamplesPerPixel": (0, 1, 2, 3, 4, 65535), "NumberOfFrames": ("0", "1", "2", "3", "-1", "1000", "99999999", "x"),
    "PlanarConfiguration": (0, 1, 2), "PhotometricInterpretation": ("MONOCHROME1", "MONOCHROME2", "RGB",
                                                                    "YBR_FULL_422", "PALETTE COLOR", "XYZ", ""),
    "RescaleSlope": ("0", "-1", "1e308", "nan", "inf", "x"), "RescaleIntercept": ("-1024", "1e308", "nan"),
    "WindowCenter": ("0", "-1e30", "nan", "40"), "WindowWidth": ("0", "1", "-5", "nan", "inf", "1e-30"),
    "VOILUTFunction": ("SIGMOID", "LINEAR_EXACT", "X"), "Modality": ("CR", "CT", "MR", "OP", "SM", "ECG", "XX"),
    "ImageOrientationPatient": (["1", "0", "0", "0", "1", "0"], ["0", "0", "0", "0", "0", "0"], ["nan"] * 6, ["1"]),
    "ImagePositionPatient": (["nan", "0", "0"], ["1e308", "0", "0"], ["0"]),
    "PixelSpacing": (["0", "0"], ["-1", "1"], ["nan", "nan"], ["1e308", "1"], ["1"]),
    "SliceThickness": ("0", "-1", "nan"), "SOPClassUID": ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2",
                                                          "1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.3"),
}
#: Modalities a caller may pass, drawn per case: formats that carry none (photographs), and DICOM
#: whose seeds are often secondary captures or ultrasound (modality outside the six) and are only
#: decoded when the caller names a modality.
CALLER_MODALITIES = {"photo": (None, None, "cxr", "retina", "pathology"),
                     "dicom": (None, None, None, "cxr", "ct", "mri", "retina", "pathology")}
WAVEFORM_TAGS = {
    "NumberOfWaveformChannels": (0, 1, 12, 13, 255, 65535), "NumberOfWaveformSamples": (0, 1, 2**20, 2**31, 2**32 - 1),
    "WaveformBitsAllocated": (0, 8, 16, 32, 64, 65535), "SamplingFrequency": ("0", "-500", "nan", "1e308", "inf"),
    "WaveformSampleInterpretation": ("SS", "UB", "SB", "MB", "AB", "SL", "XX"),
    "ChannelSensitivity": ("0", "nan", "-1", "1e308"),
}


# ------------------------------------------------------------------------------ mutation
def _dicom_transfer_syntax(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Rewrite the file meta TransferSyntaxUID in place (length and group length fixed)."""
    i = data.find(b"\x02\x00\x10\x00UI", 132, 2048)
    if i < 0:
        return mu.generic(rng, data), "bytes"
    n = int.from_bytes(data[i + 6:i + 8], "little")
    uid = rng.choice(TS_UIDS).encode()
    if len(uid) % 2:
        uid += b"\x00"
    out = data[:i + 6] + len(uid).to_bytes(2, "little") + uid + data[i + 8 + n:]
    if out[132:140] == b"\x02\x00\x00\x00UL\x04\x00":  # (0002,0000) group length
        g = int.from_bytes(out[140:144], "little") + len(uid) - n
        out = out[:140] + (g & 0xFFFFFFFF).to_bytes(4, "little") + out[144:]
    return out, f"TransferSyntaxUID={uid.decode().rstrip(chr(0))}"


class _DicomShape:
    """What :func:`_dicom_tag` needs to draw a mutation without parsing the file again.

    Whether the dataset is a waveform, the channel count of each waveform group and which
    keywords each possible target holds: the random draws depend on these alone, so a cached
    shape gives the same draws (and the same case bytes) as a fresh parse.
    """

    def __init__(self, ds):
        self.waveform = "WaveformSequence" in ds
        pool = WAVEFORM_TAGS if self.waveform else DICOM_TAGS
        self.present = {("ds",): {kw for kw in (*pool, "Modality") if kw in ds}}
        self.channels: list[int] = []
        if self.waveform:
            for g, grp in enumerate(ds.WaveformSequence):
                chans = list(grp.get("ChannelDefinitionSequence", []))
                self.channels.append(len(chans))
                self.present[("g", g)] = {kw for kw in WAVEFORM_TAGS if kw in grp}
                for c, ch in enumerate(chans):
                    self.present[("c", g, c)] = {kw for kw in WAVEFORM_TAGS if kw in ch}


#: Parsed shapes and mutated files by input digest: the same seed files recur in every case, and
#: parsing and re-writing a DICOM file through pydicom was most of a case's time (profiled).
_SHAPES: dict[bytes, _DicomShape] = {}
_TAG_CACHE: dict[tuple, bytes] = {}
_TAG_CACHE_BYTES = [0]
TAG_CACHE_LIMIT = 256 * 2**20


def _dicom_tag(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Set (or delete) one decoding-relevant element through pydicom and write the file back."""
    import pydicom

    digest = hashlib.blake2b(data, digest_size=16).digest()
    ds = None
    shape = _SHAPES.get(digest)
    if shape is None:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        shape = _DicomShape(ds)
        if len(_SHAPES) < 4096:
            _SHAPES[digest] = shape
    pool = dict(DICOM_TAGS)
    if shape.waveform:
        pool = {**WAVEFORM_TAGS, "Modality": DICOM_TAGS["Modality"]}
    kw = rng.choice(sorted(pool))
    where: tuple = ("ds",)
    if kw in WAVEFORM_TAGS and kw != "Modality":
        g = rng.randrange(len(shape.channels)) if shape.channels else rng.choice([])
        where = ("g", g)
        if kw in ("ChannelSensitivity",):
            where = ("c", g, rng.randrange(shape.channels[g]) if shape.channels[g] else rng.choice([]))
    if rng.random() < 0.12 and kw in shape.present.get(where, ()):
        v, what = None, f"{kw} deleted"
    else:
        v = rng.choice(pool[kw])
        what = f"{kw}={v}"
    key = (digest, where, kw, repr(v))
    out = _TAG_CACHE.get(key)
    if out is None:
        ds = ds if ds is not None else pydicom.dcmread(io.BytesIO(data), force=True)
        target = ds
        if where[0] != "ds":
            target = ds.WaveformSequence[where[1]]
            if where[0] == "c":
                target = target.ChannelDefinitionSequence[where[2]]
        if v is None:
            delattr(target, kw)
        else:
            setattr(target, kw, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        out = buf.getvalue()
        if _TAG_CACHE_BYTES[0] + len(out) <= TAG_CACHE_LIMIT:
            _TAG_CACHE[key] = out
            _TAG_CACHE_BYTES[0] += len(out)
    return out, what


def mutate(reader: str, rng: random.Random, files: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """One to three mutations of a seed's files; returns the files and a description of each."""
    files = dict(files)
    main = next(iter(files))
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        data = files[main]
        r = rng.random()
        what = None
        if not data:
            break
        if reader == "dicom" and r < 0.5:
            try:
                data, what = (_dicom_transfer_syntax if rng.random() < 0.2 else _dicom_tag)(rng, data)
            except Exception as e:  # noqa: BLE001 - pydicom refuses some values on write: fall back
                what = f"tag mutation skipped ({type(e).__name__})"
        elif reader == "nifti" and r < 0.6:
            gzipped = data[:2] == b"\x1f\x8b"
            import gzip as _gz

            try:
                raw = _gz.decompress(data) if gzipped else data
            except Exception:  # noqa: BLE001 - already damaged by an earlier mutation
                raw = None
            if raw is not None and len(raw) >= 348:
                raw, what = mu.nifti_header(rng, raw)
                data = mu.gz(raw) if gzipped else raw
        elif reader == "wfdb":
            if r < 0.65:
                text, what = mu.wfdb_header(rng, files["rec.hea"].decode("latin-1"))
                files["rec.hea"] = text.encode("latin-1")
                done.append(what)
                continue
            name = rng.choice(sorted(files))
            files[name] = mu.generic(rng, files[name])
            done.append(f"{name}: bytes")
            continue
        elif reader in ("photo", "slide") and r < 0.55:
            if data[:4] in (b"II*\x00", b"MM\x00*"):
                f = mu.tiff_description if reader == "slide" and rng.random() < 0.3 else mu.tiff_tag
            elif data[:4] == b"\x89PNG":
                f = mu.png_chunk
            else:
                f = mu.jpeg_segment
            try:
                data, what = f(rng, data), f.__name__
            except (IndexError, struct.error, ValueError):  # a mutator tripping on earlier damage
                data, what = None, None
        if what is None or data is None:
            data = files[main]
            f = rng.choice(mu.GENERIC)
            data, what = f(rng, data), f.__name__
        files[main] = data
        done.append(what)
    return files, done


# ------------------------------------------------------------------------------ worker
class SoftTimeout(BaseException):
    """Raised by SIGPROF inside the worker: the reader ran past the per-file CPU-time limit."""


def _on_time_limit(*_):
    raise SoftTimeout()


def install_time_limit() -> None:
    """Install the SIGPROF handler of the per-file limit (main thread only)."""
    signal.signal(signal.SIGPROF, _on_time_limit)


def arm_time_limit(seconds: float) -> None:
    """Start (``seconds`` > 0) or stop (0) the per-file limit, counted in CPU time.

    ``ITIMER_PROF`` counts the process's user and system time, so the limit means the same
    on an idle machine and on one loaded ten times over (a wall-clock limit under load marked
    ordinary cases as hangs and re-ran them alone: most of the old slide campaign's time).
    """
    signal.setitimer(signal.ITIMER_PROF, seconds)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _location(tb_list: list[traceback.FrameSummary]) -> str:
    """Innermost frame inside m3bind (where the fix belongs) and the innermost frame overall."""
    ours = [f for f in tb_list if "/m3bind/" in f.filename]
    inner = tb_list[-1] if tb_list else None
    parts = []
    if ours:
        f = ours[-1]
        parts.append(f"{Path(f.filename).name}:{f.lineno}:{f.name}")
    if inner is not None and (not ours or inner is not ours[-1]):
        parts.append(f"{Path(inner.filename).parent.name}/{Path(inner.filename).name}:{inner.lineno}:{inner.name}")
    return " <- ".join(parts[::-1]) if parts else "?"


def _invariants(sample) -> str | None:
    import numpy as np

    a = sample.array
    if not isinstance(a, np.ndarray) or a.size == 0:
        return "Sample.array is empty or not an ndarray"
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return "Sample.array holds NaN/inf"
    if sample.tiles is not None and (not isinstance(sample.tiles, np.ndarray) or sample.tiles.ndim != 4):
        return "Sample.tiles is not [N,h,w,3]"
    return None


def run_case(reader: str, seeds: list, seed: int, case: int, workdir: Path, mutations: bool = True) -> dict[str, Any]:
    """Mutate, write and load one case; classify the outcome (runs inside the worker).

    With ``mutations=False`` case ``-1 - i`` loads seed ``i`` unchanged (the worker's warm-up).
    """
    import m3bind.io
    from m3bind.errors import M3BindError

    rng = random.Random(f"{seed}:{case}")
    if mutations:
        name, files = seeds[rng.randrange(len(seeds))]
        files, what = mutate(reader, rng, files)
    else:
        (name, files), what = seeds[-1 - case], []
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "case").mkdir(parents=True)
    for fn, data in files.items():
        (workdir / "case" / fn).write_bytes(data)
    (workdir / "outside.dat").write_bytes(files.get("rec.dat", b"\x00" * 64))  # target of ../ names
    target = workdir / "case" / next(iter(files))
    modality = rng.choice(CALLER_MODALITIES[reader]) if reader in CALLER_MODALITIES else None
    res: dict[str, Any] = {"case": case, "seed": name, "mutations": what, "modality": modality}
    t0 = time.perf_counter()
    arm_time_limit(float(os.environ.get("FUZZ_SOFT_TIMEOUT", "10")))
    try:
        opts = {"max_tiles": 8} if reader == "slide" else {}
        sample = m3bind.io.load(target, modality, **opts)
        arm_time_limit(0)
        bad = _invariants(sample)
        if bad is None and reader == "wfdb":
            bad = _wfdb_escape(files)
        res.update(outcome="finding" if bad else "ok", exc="Invariant" if bad else None, message=bad,
                   location="invariant" if bad else None)
    except SoftTimeout:
        res.update(outcome="hang", exc="SoftTimeout", message="per-file time limit",
                   location=_location(traceback.extract_tb(sys.exc_info()[2])))
    except M3BindError as e:
        arm_time_limit(0)
        if isinstance(e.__context__, SoftTimeout):  # a reader's catch-all turned the limit into an error
            res.update(outcome="hang", exc="SoftTimeout", message="per-file time limit",
                       location=_location(traceback.extract_tb(e.__context__.__traceback__)))
            res["seconds"] = round(time.perf_counter() - t0, 4)
            return res
        mem = isinstance(e.__context__, MemoryError)
        res.update(outcome="memory" if mem else "rejected", exc=type(e).__name__, message=e.what[:200],
                   location=_location(traceback.extract_tb(e.__context__.__traceback__)) if mem else None)
    except MemoryError as e:
        arm_time_limit(0)
        res.update(outcome="memory", exc="MemoryError", message=str(e)[:200],
                   location=_location(traceback.extract_tb(e.__traceback__)))
    except BaseException as e:
        arm_time_limit(0)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        res.update(outcome="finding", exc=type(e).__name__, message=str(e)[:300],
                   location=_location(traceback.extract_tb(e.__traceback__)))
    res["seconds"] = round(time.perf_counter() - t0, 4)
    return res


def _wfdb_escape(files: dict[str, bytes]) -> str | None:
    """A record that loaded although its header names a signal file outside the record's folder."""
    for line in files["rec.hea"].decode("latin-1").splitlines()[1:]:
        f = line.split()
        if f and not line.lstrip().startswith("#") and ("/" in f[0] or "\\" in f[0] or f[0].startswith("..")):
            return f"signal file {f[0]!r} outside the record folder was read"
    return None


def worker_main(conn, reader: str, seed: int, mem_mb: int, workdir: str) -> None:
    """Worker loop: receive case numbers, answer result dicts; capped address space."""
    import resource
    import warnings

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    import m3bind.io
    from fuzz.seeds import SEEDS

    for k, v in WORKER_LIMITS.items():
        setattr(m3bind.io.LIMITS, k, v)
    seeds = SEEDS[reader]()
    import m3bind.io.detect
    import m3bind.io.dicom
    import m3bind.io.nifti
    import m3bind.io.photo
    import m3bind.io.wfdb_reader
    import m3bind.io.wsi

    install_time_limit()
    _quiet_stderr()
    wd = Path(workdir)
    for i in sorted({n: i for i, (n, _) in enumerate(seeds)}.values()):  # warm-up, each seed once:
        run_case(reader, seeds, seed, -1 - i, wd, mutations=False)  # lazy imports, decoder plugins
    cap = _vm_size() + mem_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn.send({"ready": True, "seeds": [n for n, _ in seeds], "as_cap_mb": cap // 2**20})
    while True:
        case = conn.recv()
        if case is None:
            return
        c0 = time.process_time()
        res = run_case(reader, seeds, seed, case, wd)
        res["cpu_s"] = time.process_time() - c0
        res["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        conn.send(res)


def _quiet_stderr() -> None:
    """Send the worker's C-level stderr to /dev/null: libtiff, OpenJPEG and a Rust panic's
    backtrace (``RUST_BACKTRACE=1`` symbolises every frame, tenths of a second per panic)
    would otherwise write per case; outcomes come back through the pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


# ------------------------------------------------------------------------------ parent
class Worker:
    """A worker process with one case in flight at most."""

    def __init__(self, ctx, reader: str, seed: int, mem_mb: int, scratch: Path, k: int):
        self.workdir = scratch / f"w{k}"
        self.conn, child = ctx.Pipe()
        env_threads = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
                       "RUST_BACKTRACE": "0"}
        os.environ.update(env_threads)
        self.proc = ctx.Process(target=worker_main, args=(child, reader, seed, mem_mb, str(self.workdir)), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(300):
            raise RuntimeError("fuzz worker did not start")
        self.info = self.conn.recv()
        self.case: int | None = None
        self.started = 0.0

    def submit(self, case: int) -> None:
        self.case, self.started, self.cpu0 = case, time.monotonic(), self.cpu_time()
        self.conn.send(case)

    def cpu_time(self) -> float:
        """User + system CPU seconds of the worker so far (``/proc/PID/stat``)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def over_limit(self, timeout: float) -> str | None:
        """Why the case in flight must be killed: past the CPU limit (stuck in C code, where
        SIGPROF cannot interrupt), or blocked past a generous wall-clock backstop."""
        if self.cpu_time() - self.cpu0 > timeout + 5:
            return "C code (CPU limit)"
        if time.monotonic() - self.started > max(120.0, 20 * timeout):
            return "blocked (wall-clock backstop)"
        return None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


class Stats:
    """Counts and unique failures, JSON-serialisable, accumulating across ``--resume`` chunks."""

    def __init__(self, reader: str, prev: dict | None):
        p = prev or {}
        self.reader = reader
        self.execs = p.get("execs", 0)
        self.outcomes = Counter(p.get("outcomes", {}))
        self.rejections = Counter(p.get("rejections", {}))
        self.failures: dict[str, dict] = {f["key"]: f for f in p.get("unique_failures", [])}
        self.wall_s = p.get("wall_s", 0.0)
        self.chunks = p.get("chunks", [])
        self.max_rss_mb = p.get("max_rss_mb", 0)
        self.cpu_s = p.get("cpu_s", 0.0)  # worker CPU time of the cases that measured it
        self.cpu_execs = p.get("cpu_execs", 0)

    def add(self, res: dict, findings_dir: Path, case_dir: Path) -> None:
        self.execs += 1
        out = res["outcome"]
        self.outcomes[out] += 1
        self.max_rss_mb = max(self.max_rss_mb, res.get("maxrss_mb", 0))
        if "cpu_s" in res:
            self.cpu_s += res["cpu_s"]
            self.cpu_execs += 1
        if out == "rejected":
            self.rejections[res["exc"]] += 1
        if out in ("ok", "rejected"):
            return
        key = f"{out}:{res.get('exc')}:{res.get('location')}"
        f = self.failures.get(key)
        if f is None:
            h = hashlib.sha1(key.encode()).hexdigest()[:10]
            dest = findings_dir / f"{self.reader}-{h}"
            shutil.rmtree(dest, ignore_errors=True)
            if case_dir.exists():
                shutil.copytree(case_dir, dest)
            f = self.failures[key] = {"key": key, "kind": out, "exc": res.get("exc"), "location": res.get("location"),
                                      "message": res.get("message"), "first_case": res["case"], "seed": res.get("seed"),
                                      "mutations": res.get("mutations"), "modality": res.get("modality"),
                                      "example": str(dest), "count": 0}
            log.warning("new %s: %s (case %d, %s)", out, key, res["case"], res.get("mutations"))
        f["count"] += 1

    def to_json(self, extra: dict) -> dict:
        findings = {k: self.outcomes.get(k, 0) for k in ("finding", "hang", "crash", "memory")}
        return {
            "reader": self.reader, "execs": self.execs, "wall_s": round(self.wall_s, 1),
            "execs_per_s": round(self.execs / self.wall_s, 2) if self.wall_s else None,
            "cpu_s": round(self.cpu_s, 1), "cpu_execs": self.cpu_execs,
            "execs_per_cpu_s": round(self.cpu_execs / self.cpu_s, 2) if self.cpu_s else None,
            "outcomes": dict(self.outcomes), "rejections": dict(self.rejections),
            "findings": findings["finding"], "hangs": findings["hang"], "crashes": findings["crash"],
            "memory_blowups": findings["memory"], "unique_failures": sorted(self.failures.values(), key=lambda f: f["key"]),
            "n_unique_failures": len(self.failures), "max_rss_mb": self.max_rss_mb, "chunks": self.chunks, **extra,
        }


def io_code_hash() -> str:
    """Short hash of the reader sources, so each chunk records which version of the fixes it ran."""
    h = hashlib.sha256()
    for p in sorted((Path(__file__).resolve().parents[1] / "m3bind" / "io").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def machine() -> dict[str, Any]:
    """CPU model, core count and load, for the record (the machine is shared)."""
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "python": platform.python_version()}


def fuzz(reader: str, execs: int, workers: int = 1, out: Path | None = None, seed: int = 0, timeout: float = 10.0,
         mem_mb: int = 2048, resume: bool = False, findings_dir: Path | None = None,
         save_every: float = 30.0, seconds: float | None = None) -> dict:
    """Run ``execs`` executions against ``reader`` (fewer if ``seconds`` of wall time pass first);
    return (and write to ``out``) the statistics."""
    prev = json.loads(out.read_text()) if resume and out and out.exists() else None
    if prev and prev.get("seed", seed) != seed:
        raise SystemExit(f"--resume with another --seed than {out} used ({prev.get('seed')})")
    stats = Stats(reader, prev)
    first_case = stats.execs
    outcomes_before = Counter(stats.outcomes)
    cpu_before = stats.cpu_s
    # the failing inputs are mutated copies of third-party files: kept under runs/ (git-ignored)
    findings_dir = findings_dir or Path(__file__).resolve().parents[1] / "runs" / "fuzz_findings"
    findings_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-{reader}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    os.environ["FUZZ_SOFT_TIMEOUT"] = str(max(1, int(timeout)))
    ctx = get_context("fork")
    pool = [Worker(ctx, reader, seed, mem_mb, scratch, k) for k in range(workers)]
    info = pool[0].info
    t0, last_save = time.monotonic(), time.monotonic()
    next_case, done = first_case, 0
    extra = {"seed": seed, "timeout_s": timeout, "mem_cap_mb": mem_mb, "worker_limits": WORKER_LIMITS,
             "seeds": info["seeds"], "as_cap_mb": info["as_cap_mb"]}

    def save():
        stats.wall_s += time.monotonic() - t0_chunk[0]
        t0_chunk[0] = time.monotonic()
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats.to_json({**extra, "machine": machine()}), indent=1))
            os.replace(tmp, out)

    t0_chunk = [t0]

    def timed_out() -> bool:
        return bool(seconds) and time.monotonic() - t0 > seconds
    try:
        while done < next_case - first_case or (next_case < first_case + execs and not timed_out()):
            for k, w in enumerate(pool):
                if w.case is None and next_case < first_case + execs and not timed_out():
                    w.submit(next_case)
                    next_case += 1
            busy = [w for w in pool if w.case is not None]
            ready = set()
            from multiprocessing.connection import wait
            for c in wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5):
                ready.add(c)
            for k, w in enumerate(pool):
                if w.case is None:
                    continue
                res = None
                if w.conn in ready:
                    try:
                        res = w.conn.recv()
                    except EOFError:
                        res = None
                if res is None and (not w.proc.is_alive() or w.proc.sentinel in ready):
                    res = {"case": w.case, "outcome": "crash", "exc": f"exit {w.proc.exitcode}",
                           "message": "worker died", "location": f"signal {-(w.proc.exitcode or 0)}"}
                elif res is None and (why := w.over_limit(timeout)):
                    res = {"case": w.case, "outcome": "hang", "exc": "HardTimeout", "message": "killed",
                           "location": why}
                if res is None:
                    continue
                case_dir = w.workdir / "case"
                # a fresh worker after a crash, a hang or a MemoryError (its state is suspect)
                dead = res["outcome"] in ("crash", "hang", "memory") or not w.proc.is_alive()
                stats.add(res, findings_dir, case_dir)
                done += 1
                w.case = None
                if dead:
                    w.kill()
                    pool[k] = Worker(ctx, reader, seed, mem_mb, scratch, k)
            if time.monotonic() - last_save > save_every:
                save()
                last_save = time.monotonic()
                log.info("%s: %d execs, outcomes %s", reader, stats.execs, dict(stats.outcomes))
    finally:
        for w in pool:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            w.kill()
        stats.chunks.append({"first_case": first_case, "execs": done, "io_code": io_code_hash(),
                             "harness": HARNESS, "wall_s": round(time.monotonic() - t0, 1),
                             "cpu_s": round(stats.cpu_s - cpu_before, 1), "loadavg": os.getloadavg(),
                             "outcomes": dict(stats.outcomes - outcomes_before),
                             "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        save()
        shutil.rmtree(scratch, ignore_errors=True)
    return stats.to_json(extra)


def replay(reader: str, case: int, seed: int = 0, out_dir: Path = Path("fuzz_case")) -> Path:
    """Write the files of case ``case`` (same seed) to ``out_dir`` for a regression test."""
    from fuzz.seeds import SEEDS

    seeds = SEEDS[reader]()
    rng = random.Random(f"{seed}:{case}")
    _name, files = seeds[rng.randrange(len(seeds))]
    files, what = mutate(reader, rng, files)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fn, data in files.items():
        (out_dir / fn).write_bytes(data)
    log.info("case %d: %s", case, what)
    return out_dir / next(iter(files))


def _stop(*_):
    raise KeyboardInterrupt  # the chunk is recorded and the statistics saved on the way out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reader", choices=READERS, required=True)
    ap.add_argument("--execs", type=int, default=100_000, help="executions in this run")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, help="JSON statistics (written every 30 s and at the end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-file time limit, seconds")
    ap.add_argument("--mem-mb", type=int, default=2048, help="address space allowed above the worker's start")
    ap.add_argument("--resume", action="store_true", help="continue the counts and case numbers of --out")
    ap.add_argument("--seconds", type=float, help="stop submitting cases after this much wall time")
    ap.add_argument("--replay", type=int, metavar="CASE", help="write the files of one case and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)  # a background job ignores SIGINT: TERM stops it cleanly
    if args.replay is not None:
        print(replay(args.reader, args.replay, args.seed))
        return 0
    r = fuzz(args.reader, args.execs, args.workers, args.out, args.seed, args.timeout, args.mem_mb, args.resume,
             seconds=args.seconds)
    print(json.dumps({k: r[k] for k in ("reader", "execs", "execs_per_s", "outcomes", "n_unique_failures")}))
    return 1 if r["n_unique_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
