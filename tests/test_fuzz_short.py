"""A short fuzzing run of every reader for CI (the long runs: ``fuzz/fuzz_readers.py``).

Hypothesis draws case numbers; each case is the same seeded, structure-aware mutation of a
real sample file that the long fuzzer runs (:func:`fuzz.fuzz_readers.run_case`), loaded in
this process with the fuzzer's tightened reader limits and a per-file time limit. Every
outcome must be a Sample that passes the invariants or a one-line ``M3BindError``; an
unexpected exception, a hang or a memory error is a finding and fails the test.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fuzz import fuzz_readers as fr
from fuzz.seeds import SEEDS

#: Executions per reader: a few hundred in all, seconds per reader (slides decode slowest).
EXAMPLES = {"dicom": 100, "nifti": 60, "wfdb": 80, "photo": 80, "slide": 20}


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    """Worker limits, a SIGPROF (CPU-time) soft limit and a cache of seeds, restored afterwards."""
    import warnings

    import m3bind.io

    saved = {k: getattr(m3bind.io.LIMITS, k) for k in fr.WORKER_LIMITS}
    for k, v in fr.WORKER_LIMITS.items():
        setattr(m3bind.io.LIMITS, k, v)

    old = signal.getsignal(signal.SIGPROF)
    fr.install_time_limit()
    seeds: dict[str, list] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield seeds, tmp_path_factory.mktemp("fuzz")
    signal.signal(signal.SIGPROF, old)
    for k, v in saved.items():
        setattr(m3bind.io.LIMITS, k, v)


@pytest.mark.parametrize("reader", fr.READERS)
def test_short_fuzz_run_has_no_finding(reader, fuzz_env, monkeypatch):
    seeds, work = fuzz_env
    if reader not in seeds:
        seeds[reader] = SEEDS[reader]()
    if not seeds[reader]:
        pytest.skip(f"no sample files installed for {reader}")
    monkeypatch.setenv("FUZZ_SOFT_TIMEOUT", "20")
    outcomes: list[dict] = []

    @settings(max_examples=EXAMPLES[reader], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=st.integers(min_value=0, max_value=2**31))
    def one(case):
        res = fr.run_case(reader, seeds[reader], 12345, case, work / reader)
        outcomes.append(res)
        assert res["outcome"] in ("ok", "rejected"), res

    one()
    assert len(outcomes) >= EXAMPLES[reader] // 2
    assert any(r["outcome"] == "rejected" for r in outcomes)  # the mutations do damage files


def test_mutations_are_reproducible():
    """A case number alone reproduces a finding: same seed and case, same bytes."""
    import random

    seeds = SEEDS["nifti"]()
    if not seeds:
        pytest.skip("nibabel's sample files are not installed")
    a = fr.mutate("nifti", random.Random("0:7"), seeds[0][1])
    b = fr.mutate("nifti", random.Random("0:7"), seeds[0][1])
    assert a == b and a[0] != seeds[0][1]


def _reference_dicom_tag(rng, data):
    """The DICOM tag mutation written plainly (parse, draw, set, write), without any cache."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pool = dict(fr.DICOM_TAGS)
    if "WaveformSequence" in ds:
        pool = {**fr.WAVEFORM_TAGS, "Modality": fr.DICOM_TAGS["Modality"]}
    kw = rng.choice(sorted(pool))
    target = ds
    if kw in fr.WAVEFORM_TAGS and kw != "Modality":
        grp = rng.choice(list(ds.WaveformSequence))
        target = grp
        if kw == "ChannelSensitivity":
            target = rng.choice(list(grp.ChannelDefinitionSequence))
    if rng.random() < 0.12 and kw in target:
        delattr(target, kw)
        what = f"{kw} deleted"
    else:
        v = rng.choice(pool[kw])
        setattr(target, kw, v)
        what = f"{kw}={v}"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue(), what


def test_cached_dicom_tag_mutation_matches_a_plain_one():
    """The fuzzer caches parsed shapes and mutated files; the bytes and the random stream must
    be those of a plain parse-and-write, cold cache and warm, waveform seed included."""
    import random
    import warnings

    seeds = dict(SEEDS["dicom"]())
    names = [n for n in ("ecg_dicom", "ct_dicom", "mr_dicom") if n in seeds]
    if not names:
        pytest.skip("pydicom's sample files are not installed")
    fr._SHAPES.clear()
    fr._TAG_CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(2):  # cold, then warm
            for name in names:
                data = seeds[name]["case.dcm"]
                for case in range(12):
                    r1, r2 = random.Random(f"{name}:{case}"), random.Random(f"{name}:{case}")
                    assert fr._dicom_tag(r1, data) == _reference_dicom_tag(r2, data), (rnd, name, case)
                    assert r1.random() == r2.random()
    assert fr._TAG_CACHE


def _spin(*_a, **_k):
    t = __import__("time").process_time() + 30
    while __import__("time").process_time() < t:
        pass


def _spin_then_convert(*_a, **_k):
    """A reader whose catch-all turns anything (the time limit included) into a one-line error."""
    from m3bind.errors import CorruptFile

    try:
        _spin()
    except BaseException as e:  # noqa: BLE001 - what some readers do around C decoders
        raise CorruptFile(f"damaged: {type(e).__name__}", "x") from None


@pytest.mark.parametrize("reader_fn", [_spin, _spin_then_convert])
def test_cpu_time_limit_reports_a_hang(reader_fn, fuzz_env, monkeypatch):
    """The per-file limit counts CPU time (SIGPROF) and survives a reader's catch-all."""
    import m3bind.io

    seeds, work = fuzz_env
    if "photo" not in seeds:
        seeds["photo"] = SEEDS["photo"]()
    if not seeds["photo"]:
        pytest.skip("no sample photographs installed")
    monkeypatch.setenv("FUZZ_SOFT_TIMEOUT", "1")
    monkeypatch.setattr(m3bind.io, "load", reader_fn)
    res = fr.run_case("photo", seeds["photo"], 0, 1, work / "spin")
    assert res["outcome"] == "hang" and res["exc"] == "SoftTimeout", res
    assert 0.9 < res["seconds"] < 20


def test_crash_trial_kill_points_lie_inside_the_run():
    """Kill points: after k of n committed items (k < n), delayed by at most the reference's
    time to its first commit (k = 0) or its median gap between commits."""
    import random

    sys.path.insert(0, str(REPO / "benchmarks"))
    from crash_trials import kill_plan

    ref = {"seconds": 10.0, "commits": [(6.0, 1), (7.0, 2), (7.5, 3), (9.5, 4)]}
    rng = random.Random(0)
    plans = [kill_plan(rng, ref, 4) for _ in range(400)]
    assert {k for k, _ in plans} == {0, 1, 2, 3}
    assert all(0 <= d <= 6.0 for k, d in plans if k == 0)
    assert all(0 <= d <= 1.0 for k, d in plans if k > 0)  # gaps 1.0, 0.5, 2.0: median 1.0


@pytest.mark.parametrize("reader", ["slide", "photo"])
def test_mutations_stay_the_size_of_their_seed(reader):
    """Found in the slide campaign: an ImageDescription count damaged by an earlier mutation made
    the description mutator pad the file to that count (680 MB), and the worker died of it."""
    import random

    seeds = SEEDS[reader]()
    if not seeds:
        pytest.skip(f"no sample files installed for {reader}")
    assert len(fr.mutate(reader, random.Random("0:7366"), dict(seeds[0][1]))[0]) == 1  # one file
    for case in [7366, *range(300)]:
        rng = random.Random(f"0:{case}")
        _name, files = seeds[rng.randrange(len(seeds))]
        out, _what = fr.mutate(reader, rng, files)
        for fn, data in out.items():
            assert len(data) <= len(files[fn]) + 4096, (case, fn, len(data))
