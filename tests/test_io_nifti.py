"""NIfTI reading: canonical orientation, [Z, Y, X] layout, spacing, 4D, multi-sequence folders."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from m3bind.errors import TooLarge
from m3bind.io import LIMITS, detect, load


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_axis_convention_on_a_known_volume(tmp_path):
    # LAS-oriented file (x flipped): voxel (i, j, k) holds 100*i + 10*j + k
    i, j, k = np.meshgrid(np.arange(4), np.arange(3), np.arange(2), indexing="ij")
    data = (100 * i + 10 * j + k).astype(np.float32)
    affine = np.diag([-2.0, 3.0, 4.0, 1.0])  # x towards the left, y anterior, z superior
    s = load(_write(tmp_path / "las.nii.gz", data, affine), "mri")
    assert s.format == "nifti" and s.array.shape == (2, 3, 4)
    assert s.spacing == pytest.approx((4.0, 3.0, 2.0))
    # axis 0 inferior->superior: k increases
    assert s.array[1, 0, 0] - s.array[0, 0, 0] == 1
    # axis 1 anterior->posterior: j (anterior) decreases
    assert s.array[0, 0, 0] - s.array[0, 1, 0] == 10
    # axis 2 right->left: file x already runs towards the left, so i increases along axis 2
    assert s.array[0, 0, 1] - s.array[0, 0, 0] == 100


def test_example4d_channels_and_spacing(sample_file):
    path = sample_file("nifti_4d")
    assert detect(path) == ("nifti", None)
    s = load(path)
    img = nib.as_closest_canonical(nib.load(str(path)))
    assert s.array.shape == (2, 24, 96, 128) and s.channel_names == ["vol0", "vol1"]
    zx, zy, zz = img.header.get_zooms()[:3]
    assert s.spacing == pytest.approx((zz, zy, zx))
    data = np.asarray(img.dataobj, dtype=np.float32)
    np.testing.assert_array_equal(s.array[1], np.transpose(data[..., 1], (2, 1, 0))[:, ::-1, ::-1])
    assert s.modality == "mri" and s.modality_guess


def test_mni_template_is_mri_with_brain_in_the_middle(sample_file):
    s = load(sample_file("mni_t1"))
    assert s.modality == "mri" and s.array.shape == (189, 233, 197) and s.spacing == (1.0, 1.0, 1.0)
    mid = s.array[s.array.shape[0] // 2]
    assert mid[100:130, 85:115].mean() > 5 * mid[:10, :10].mean() + 1


def test_hu_like_nifti_guessed_ct(tmp_path):
    data = np.full((8, 8, 4), -1000.0, np.float32)
    data[2:6, 2:6] = 40.0
    s = load(_write(tmp_path / "ct.nii", data, np.eye(4)))
    assert s.modality == "ct" and s.modality_guess


def test_mri_study_folder_stacks_sequences(tmp_path):
    rng = np.random.default_rng(0)
    vols = {n: rng.random((6, 5, 4)).astype(np.float32) for n in ("t1", "flair")}
    for n, v in vols.items():
        _write(tmp_path / f"{n}.nii.gz", v, np.eye(4))
    assert detect(tmp_path) == ("nifti", "mri")
    s = load(tmp_path)
    assert s.channel_names == ["t1", "flair"] and s.array.shape == (2, 4, 5, 6)
    np.testing.assert_allclose(s.array[0], np.transpose(vols["t1"], (2, 1, 0))[:, ::-1, ::-1])


def test_volume_limit_from_header_before_loading(tmp_path, monkeypatch):
    path = _write(tmp_path / "big.nii", np.zeros((20, 20, 20), np.int16), np.eye(4))
    monkeypatch.setattr(LIMITS, "max_pixels", 1000)
    with pytest.raises(TooLarge):
        load(path)


def test_nan_voxels_become_zero(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    s = load(_write(tmp_path / "nan.nii", data, np.eye(4)), "mri")
    assert np.isfinite(s.array).all() and s.meta["nonfinite_voxels"] == 1 and s.array.sum() == 63
