"""DICOM reading against the real pydicom / pydicom-data test files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

from m3bind.errors import CorruptFile, TooLarge, UnsupportedFormat
from m3bind.io import LIMITS, detect, load
from m3bind.io.dicom import list_series, patient_ref, sort_slices
from m3bind.io.leads import STANDARD_LEADS


def test_ecg_waveform_twelve_leads_at_1000hz_in_mv(sample_file):
    path = sample_file("ecg_dicom")
    s = load(path)
    assert (s.modality, s.format) == ("ecg", "dicom")
    assert s.sampling_rate == 1000.0
    assert s.lead_names == list(STANDARD_LEADS)
    assert s.array.shape == (12, 10000) and s.array.dtype == np.float32
    # independent decoding: raw int16 interleaved samples x sensitivity (uV) -> mV
    ds = pydicom.dcmread(path)
    g = ds.WaveformSequence[0]
    raw = np.frombuffer(g.WaveformData, "<i2").reshape(g.NumberOfWaveformSamples, g.NumberOfWaveformChannels)
    file_names = [c.ChannelSourceSequence[0].CodeMeaning for c in g.ChannelDefinitionSequence]
    assert file_names[0] == "Lead I (Einthoven)" and file_names[3] == "Lead aVR" and file_names[11] == "Lead V6"
    for i, ch in enumerate(g.ChannelDefinitionSequence):
        expected = raw[:, i] * float(ch.ChannelSensitivity) * float(ch.ChannelSensitivityCorrectionFactor) / 1000.0
        np.testing.assert_allclose(s.array[i], expected, atol=1e-6)
    assert s.meta["lead_mask"] == [True] * 12 and s.meta["multiplex_group"] == "RHYTHM"
    # Einthoven's law holds in the recorded limb leads: II = I + III (within quantisation)
    assert np.abs(s.array[1] - (s.array[0] + s.array[2])).mean() < 0.01


def test_ct_values_are_hounsfield_units(sample_file):
    path = sample_file("ct_512")
    s = load(path)
    assert s.modality == "ct" and s.array.shape == (1, 512, 512)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(s.array[0], hu.astype(np.float32))
    a = s.array[0]
    air = ((a > -1100) & (a < -900)).mean()
    assert air > 0.05, "air inside the scan field should read about -1000 HU"
    assert 0 <= np.median(a[240:270, 240:270]) <= 80, "brain parenchyma reads 0-80 HU"
    assert s.window == (40.0, 100.0)
    assert s.spacing[1:] == pytest.approx((0.478516, 0.478516))


def test_ct_small_spacing_and_window(sample_file):
    s = load(sample_file("ct_dicom"))
    assert s.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    assert s.meta["plane"] == "axial"
    assert s.array.min() >= -1024


@pytest.mark.parametrize("compressed,reference", [
    ("mr_rle", "mr_dicom"), ("mr_j2k", "mr_dicom"), ("mr_jpegls", "mr_dicom"),
    ("enhanced_mr_rle", "enhanced_mr"), ("enhanced_mr_jpegls", "enhanced_mr"), ("ct_512_j2k", "ct_512"),
])
def test_lossless_transfer_syntaxes_decode_identically(sample_file, compressed, reference):
    a, b = load(sample_file(compressed)), load(sample_file(reference))
    assert a.meta["transfer_syntax"] != b.meta["transfer_syntax"]
    np.testing.assert_array_equal(a.array, b.array)


@pytest.mark.parametrize("name", ["jpeg2000", "jpeg_lossy", "jpeg_ll_16"])
def test_compressed_secondary_captures_read_with_a_modality(sample_file, name):
    with pytest.raises(UnsupportedFormat, match="pass a modality"):
        load(sample_file(name))
    s = load(sample_file(name), "ct")
    assert s.array.ndim == 3 and np.isfinite(s.array).all() and s.array.std() > 0


def test_rgb_rle_and_jpeg_as_fundus(sample_file):
    for name in ("rgb_rle", "rgb_jpeg"):
        s = load(sample_file(name), "retina")
        assert s.array.dtype == np.uint8 and s.array.shape == (100, 100, 3)
    # SC_rgb_rle: the top rows are pure red (255, 0, 0) in pydicom's reference
    s = load(sample_file("rgb_rle"), "retina")
    assert tuple(s.array[2, 50]) == (255, 0, 0)


def test_cxr_monochrome1_inverted_with_file_window(sample_file):
    path = sample_file("cxr_dicom")
    s = load(path)
    assert s.modality == "cxr" and s.array.dtype == np.float32 and s.array.ndim == 2
    assert 0.0 <= s.array.min() and s.array.max() <= 1.0
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1, inverted
    np.testing.assert_allclose(s.array, expected, atol=1e-5)
    assert "MONOCHROME1" in s.meta["voi"]
    # higher = brighter: the mediastinum (centre) is brighter than the lung fields
    h, w_ = s.array.shape
    centre = s.array[h // 3:h // 2, w_ // 2 - 40:w_ // 2 + 40].mean()
    lung = s.array[h // 3:h // 2, w_ // 4 - 40:w_ // 4 + 40].mean()
    assert centre > lung


def test_cxr_jpeg2000_lossless_matches(sample_file):
    np.testing.assert_array_equal(load(sample_file("cxr_j2k")).array, load(sample_file("cxr_dicom")).array)


def test_voi_lut_sequence_applied(sample_file):
    from pydicom.pixels import apply_voi_lut

    path = sample_file("voi_lut")
    s = load(path, "cxr")
    ds = pydicom.dcmread(path)
    bits = ds.VOILUTSequence[0].LUTDescriptor[2]
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, np.float64)
    first = ds.VOILUTSequence[0].LUTDescriptor[1]
    expected = lut[np.clip(ds.pixel_array.astype(int) - first, 0, len(lut) - 1)] / (2**bits - 1)
    np.testing.assert_allclose(s.array, expected, atol=1e-6)
    np.testing.assert_allclose(s.array, apply_voi_lut(ds.pixel_array, ds) / (2**bits - 1), atol=1e-6)
    assert s.meta["voi"] == "VOI LUT"


def test_modality_lut_sequence_applied(sample_file):
    from pydicom.pixels import apply_modality_lut

    path = sample_file("modality_lut")
    s = load(path, "ct")
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds
    np.testing.assert_array_equal(s.array[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


def test_op_and_sm_modalities(sample_file, tmp_path):
    ds = pydicom.dcmread(sample_file("rgb_2frame"))
    ds.Modality = "OP"
    ds.save_as(tmp_path / "op.dcm")
    s = load(tmp_path / "op.dcm")
    assert (s.modality, s.array.shape, s.array.dtype) == ("retina", (100, 100, 3), np.uint8)
    ds.Modality = "SM"
    ds.save_as(tmp_path / "sm.dcm")
    s = load(tmp_path / "sm.dcm")
    assert s.modality == "pathology" and s.tiles.shape == (2, 100, 100, 3)
    np.testing.assert_array_equal(s.tiles, ds.pixel_array)


def test_enhanced_ct_per_frame_groups(sample_file):
    path = sample_file("enhanced_ct")
    s = load(path)
    ds = pydicom.dcmread(path)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert s.array.shape == (2, 512, 512) and s.meta["enhanced"]
    assert s.spacing == pytest.approx((abs(z[1] - z[0]), 0.388672, 0.388672))
    order = np.argsort(z)  # inferior -> superior
    iop = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop[0] == -1.0  # rows run towards the patient's right: flipped to LPS index order
    expected = ds.pixel_array[order][:, :, ::-1].astype(np.float32) - 1024.0  # shared rescale -1024
    np.testing.assert_array_equal(s.array, expected)
    assert s.window == (49.0, 102.0)


def test_phi_kept_out_of_meta_unless_asked(sample_file):
    path = sample_file("ecg_dicom")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    s = load(path)
    dumped = json.dumps(s.meta)
    assert str(ds.PatientID) not in dumped and str(ds.PatientBirthDate) not in dumped and "phi" not in s.meta
    assert s.meta["patient_ref"] == patient_ref(str(ds.PatientID)) and s.meta["patient_ref"] != str(ds.PatientID)
    assert s.meta["study_uid"] == ds.StudyInstanceUID
    kept = load(path, keep_phi=True)
    assert kept.meta["phi"]["PatientID"] == str(ds.PatientID)
    assert kept.meta["phi"]["PatientBirthDate"] == str(ds.PatientBirthDate)


def test_sort_slices_by_position_on_the_normal():
    iop = [1, 0, 0, 0, 1, 0]
    order, dz = sort_slices([[0, 0, 10.0], [0, 0, -5.0], [0, 0, 2.5]], iop, [1, 2, 3])
    assert order == [1, 2, 0] and dz == pytest.approx(7.5)
    # oblique: positions along the normal of a tilted plane
    iop = [1, 0, 0, 0, np.cos(0.3), np.sin(0.3)]
    n = np.cross(iop[:3], iop[3:])
    order, dz = sort_slices([list(2 * n), list(0 * n), list(1 * n)], iop, [None] * 3)
    assert order == [1, 2, 0] and dz == pytest.approx(1.0)
    # without positions: InstanceNumber
    order, dz = sort_slices([None, None], None, [7, 3])
    assert order == [1, 0] and dz is None


def _write_ct_series(src, folder, n=5, gap=2.5, series_uid="1.2.3.4.5"):
    """Copies of one CT slice with shuffled InstanceNumbers; pixel value k marks position rank k."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(src)
    ranks = [3, 0, 4, 1, 2][:n]
    for i, rank in enumerate(ranks):
        ds = base.copy()
        arr = np.full(base.pixel_array.shape, 1024 + rank * 10, np.uint16)
        ds.PixelData = arr.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, -100.0 + rank * gap]
        ds.InstanceNumber = n - i  # deliberately unrelated to position
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{i}"
        ds.save_as(folder / f"slice{i:03d}.dcm", enforce_file_format=True)
    return folder


def test_series_folder_sorted_by_position(sample_file, tmp_path):
    folder = _write_ct_series(sample_file("ct_dicom"), tmp_path / "series")
    (folder / "notes.txt").write_text("not dicom")
    assert detect(folder) == ("dicom", "ct")
    s = load(folder)
    assert s.array.shape[0] == 5 and s.spacing[0] == pytest.approx(2.5)
    # intercept -1024: rank k reads k*10 HU, slices ordered inferior->superior
    np.testing.assert_array_equal(s.array[:, 0, 0], [0.0, 10.0, 20.0, 30.0, 40.0])
    assert s.meta["n_images"] == 5 and "uneven_slice_spacing" not in s.meta


def test_mixed_series_split_not_mixed(sample_file, tmp_path):
    folder = _write_ct_series(sample_file("ct_dicom"), tmp_path / "mixed")
    _write_ct_series(sample_file("ct_dicom"), folder / "other", n=3, series_uid="9.8.7")
    shutil.copy(sample_file("mr_dicom"), folder / "mr.dcm")
    series = list_series(folder)
    assert sorted(s["n_files"] for s in series) == [1, 3, 5]
    with pytest.raises(UnsupportedFormat, match="3 DICOM series") as e:
        load(folder)
    assert "1.2.3.4.5" in str(e.value) and "9.8.7" in str(e.value) and "\n" not in str(e.value)
    s = load(folder, series="9.8.7")
    assert s.array.shape[0] == 3
    assert load(folder, "mri").array.shape == (1, 64, 64)  # the only MR series


def test_unsupported_dicom_objects(sample_file):
    with pytest.raises(UnsupportedFormat, match="RTPLAN"):
        load(sample_file("rtplan"))


def test_truncated_pixel_data(sample_file):
    with pytest.raises(CorruptFile, match="pixel data"):
        load(sample_file("mr_truncated"))


def test_pixel_limit_checked_before_decoding(sample_file, monkeypatch):
    monkeypatch.setattr(LIMITS, "max_pixels", 1000)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    with pytest.raises(TooLarge, match="exceeds the limit"):
        load(sample_file("ct_dicom"))
