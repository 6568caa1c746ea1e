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
    """Worker limits, a SIGALRM soft time limit and a cache of seeds, restored afterwards."""
    import warnings

    import m3bind.io

    saved = {k: getattr(m3bind.io.LIMITS, k) for k in fr.WORKER_LIMITS}
    for k, v in fr.WORKER_LIMITS.items():
        setattr(m3bind.io.LIMITS, k, v)

    def _alarm(*_):
        raise fr.SoftTimeout()

    old = signal.signal(signal.SIGALRM, _alarm)
    seeds: dict[str, list] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield seeds, tmp_path_factory.mktemp("fuzz")
    signal.signal(signal.SIGALRM, old)
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
