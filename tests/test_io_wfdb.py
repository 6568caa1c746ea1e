"""WFDB reading: the real DICOM ECG written with wfdb.wrsamp reads back; lead spellings; units."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb

from m3bind.errors import CorruptFile
from m3bind.io import detect, load
from m3bind.io.leads import STANDARD_LEADS, canonical_lead


@pytest.mark.parametrize("name,std", [
    ("AVR", "aVR"), ("aVR", "aVR"), ("avr", "aVR"), ("V1 ", "V1"), ("MLII", "II"), ("lead I", "I"),
    ("Lead I (Einthoven)", "I"), ("DIII", "III"), ("C4", "V4"), ("lead_avl", "aVL"), ("ECG II", "II"),
    ("V4R", None), ("RESP", None), ("X", None),
])
def test_lead_names(name, std):
    assert canonical_lead(name) == std


def test_dicom_ecg_written_with_wrsamp_reads_back(sample_file, tmp_path):
    ecg = load(sample_file("ecg_dicom"))
    names = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]  # PhysioNet spelling
    gain = 800.0  # 1.25 uV per ADC unit, the DICOM file's own resolution
    wfdb.wrsamp("ecg", fs=ecg.sampling_rate, units=["mV"] * 12, sig_name=names,
                p_signal=ecg.array.T.astype(np.float64), fmt=["16"] * 12, adc_gain=[gain] * 12,
                baseline=[0] * 12, comments=["Age: 42", "Sex: F", "Dx: sinus rhythm"], write_dir=str(tmp_path))
    hea = tmp_path / "ecg.hea"
    assert detect(hea) == ("wfdb", "ecg")
    s = load(hea)
    assert (s.format, s.modality, s.sampling_rate) == ("wfdb", "ecg", 1000.0)
    assert s.lead_names == list(STANDARD_LEADS) and s.array.shape == (12, 10000)
    np.testing.assert_allclose(s.array, ecg.array, atol=0.5 / gain + 1e-6)
    assert s.meta["age"] == "42" and s.meta["sex"] == "F" and s.meta["diagnosis"] == "sinus rhythm"
    # the same record named without extension, or by its folder
    np.testing.assert_array_equal(load(tmp_path / "ecg").array, s.array)
    np.testing.assert_array_equal(load(tmp_path).array, s.array)


def test_odd_spellings_units_and_missing_leads(tmp_path):
    fs, n = 360.0, 720
    t = np.arange(n) / fs
    sig_uv = np.stack([1000 * np.sin(2 * np.pi * f * t) for f in (1, 2, 3, 4)], axis=1)  # in uV
    names = ["v1", "avr", "MLII", "resp"]
    wfdb.wrsamp("rec", fs=fs, units=["uV"] * 4, sig_name=names, p_signal=sig_uv, fmt=["16"] * 4,
                adc_gain=[10.0] * 4, baseline=[0] * 4, write_dir=str(tmp_path))
    s = load(tmp_path / "rec.hea")
    idx = {lead: i for i, lead in enumerate(STANDARD_LEADS)}
    np.testing.assert_allclose(s.array[idx["V1"]], sig_uv[:, 0] / 1000, atol=1e-4)  # uV -> mV
    np.testing.assert_allclose(s.array[idx["aVR"]], sig_uv[:, 1] / 1000, atol=1e-4)
    np.testing.assert_allclose(s.array[idx["II"]], sig_uv[:, 2] / 1000, atol=1e-4)
    mask = dict(zip(STANDARD_LEADS, s.meta["lead_mask"]))
    assert [k for k, v in mask.items() if v] == ["II", "aVR", "V1"]
    assert not s.array[idx["I"]].any() and s.meta["extra_leads"] == ["resp"]
    assert s.sampling_rate == 360.0


def test_missing_signal_file(tmp_path):
    wfdb.wrsamp("rec", fs=500, units=["mV"], sig_name=["II"], p_signal=np.zeros((100, 1)), fmt=["16"],
                adc_gain=[200.0], baseline=[0], write_dir=str(tmp_path))
    (tmp_path / "rec.dat").unlink()
    with pytest.raises(CorruptFile, match="signal file rec.dat is missing"):
        load(tmp_path / "rec.hea")


def test_truncated_signal_file(tmp_path):
    wfdb.wrsamp("rec", fs=500, units=["mV"], sig_name=["II"], p_signal=np.zeros((1000, 1)), fmt=["16"],
                adc_gain=[200.0], baseline=[0], write_dir=str(tmp_path))
    dat = tmp_path / "rec.dat"
    dat.write_bytes(dat.read_bytes()[:500])
    with pytest.raises(CorruptFile):
        load(tmp_path / "rec.hea")
