"""Write rendered items in their real file formats.

DICOM (pydicom 3: file meta, explicit VR little endian, ``save_as(enforce_file_format=True)``)
for chest radiographs (DX) and CT series (one file per slice, ``ImagePositionPatient``,
``RescaleSlope/Intercept``); WFDB for ECGs (format 16 as ``wfdb.wrsamp`` writes it, mV, 12 standard leads,
age/sex/patient in header comments); NIfTI for MRI (one file per sequence in a study
folder, affine with the voxel spacing); PNG for fundus photographs; pyramidal tiled TIFF
for slides (tifffile; full resolution first, reduced levels as further tiled pages marked
reduced-resolution, resolution tags in pixels per centimetre).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

_ORG_ROOT = "1.2.826.0.1.3680043.10.1457."  # UID prefix for simulated m3bind data


def _uid(*parts) -> str:
    """A deterministic DICOM UID from identifying parts (same input, same UID)."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix=_ORG_ROOT, entropy_srcs=[str(p) for p in parts])


def _base_dataset(modality: str, patient_id: str, age: int, sex: str, date: _dt.date,
                  study_key: str, series_key: str, sop_key: str, sop_class: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(sop_key)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(study_key)
    ds.SeriesInstanceUID = _uid(series_key)
    ds.FrameOfReferenceUID = _uid(series_key, "for")
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = f"SIM^{patient_id}"
    ds.PatientSex = sex
    ds.PatientAge = f"{min(age, 999):03d}Y"
    ds.PatientBirthDate = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = "090000"
    ds.AccessionNumber = study_key[-16:]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Manufacturer = "m3bind simulated cohort"
    ds.BurnedInAnnotation = "NO"
    return ds


def write_cxr_dicom(path: Path, image: np.ndarray, spacing: float, *, patient_id: str, age: int, sex: str,
                    date: _dt.date, item_id: str) -> Path:
    """Write a ``[H, W]`` image in [0, 1] as a 12-bit DX DICOM (MONOCHROME2, window tags)."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    ds = _base_dataset("DX", patient_id, age, sex, date, f"{item_id}/study", f"{item_id}/series",
                       f"{item_id}/sop", DigitalXRayImageStorageForPresentation)
    pixels = np.round(np.clip(image, 0, 1) * 4095).astype(np.uint16)
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12, generate_instance_uid=False)
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]  # PA as displayed: rows run to the patient's left, columns to the feet
    ds.InstanceNumber = 1
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.ImagerPixelSpacing = ds.PixelSpacing
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, volume_hu: np.ndarray, spacing, *, patient_id: str, age: int, sex: str,
                    date: _dt.date, item_id: str) -> Path:
    """Write a ``[Z, Y, X]`` HU volume as a CT series folder, one DICOM file per slice."""
    from pydicom.uid import CTImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = (float(s) for s in spacing)
    nz, ny, nx = volume_hu.shape
    stored = np.round(volume_hu + 1024).clip(0, 4095).astype(np.uint16)
    # one dataset reused for every slice (only the per-slice tags change): much faster than
    # building 24+ datasets from scratch
    ds = _base_dataset("CT", patient_id, age, sex, date, f"{item_id}/study", f"{item_id}/series",
                       f"{item_id}/sop/0", CTImageStorage)
    ds.set_pixel_data(stored[0], photometric_interpretation="MONOCHROME2", bits_stored=12, generate_instance_uid=False)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = f"{sz:.3f}"
    ds.SpacingBetweenSlices = f"{sz:.3f}"
    ds.PixelSpacing = [f"{sy:.4f}", f"{sx:.4f}"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.KVP = "120"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS"
    encoder = None
    for k in range(nz):
        uid = _uid(f"{item_id}/sop/{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        zpos = f"{k * sz - sz * nz / 2:.3f}"
        ds.ImagePositionPatient = [f"{-sx * nx / 2:.3f}", f"{-sy * ny / 2:.3f}", zpos]
        ds.SliceLocation = zpos
        ds.PixelData = stored[k].tobytes()
        if encoder is None:  # the first slice through pydicom's own writer (validates the file meta)
            ds.save_as(folder / f"slice_{k:04d}.dcm", enforce_file_format=True)
            encoder = _SliceEncoder(ds, _CT_SLICE_TAGS)
        else:
            (folder / f"slice_{k:04d}.dcm").write_bytes(encoder.encode(ds))
    return folder


#: The tags that differ between the slices of one series (file meta aside).
_CT_SLICE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


class _SliceEncoder:
    """Encodes further slices of a series whose datasets differ from the first only in
    ``varying`` tags (and the file meta's SOP instance UID), reusing the encoded bytes of
    every other element: the same bytes ``Dataset.save_as(enforce_file_format=True)``
    writes (explicit VR little endian), several times faster than encoding every element
    of every slice again.
    """

    def __init__(self, ds, varying):
        self.varying = [t for t in sorted(varying) if t in ds]
        self.runs: list[bytes] = []  # encoded constant elements between the varying ones
        run: list = []
        for elem in ds:
            if int(elem.tag) in self.varying:
                self.runs.append(self._encode(run))
                run = []
            else:
                run.append(elem)
        self.runs.append(self._encode(run))

    @staticmethod
    def _encode(elems) -> bytes:
        from pydicom.dataset import Dataset
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        sub = Dataset()
        for e in elems:
            sub.add(e)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, sub)
        return fp.getvalue()

    def encode(self, ds) -> bytes:
        """The file bytes of ``ds`` (preamble, file meta, data set)."""
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_data_element, write_file_meta_info

        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        parts = [fp.getvalue(), self.runs[0]]
        for tag, run in zip(self.varying, self.runs[1:]):
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, ds[tag])
            parts += [fp.getvalue(), run]
        return b"".join(parts)


def write_ecg_wfdb(record: Path, signal_mv: np.ndarray, fs: float, lead_names, *, patient_id: str,
                   age: int, sex: str, date: _dt.date, report: str = "") -> Path:
    """Write ``[12, T]`` mV as a WFDB record (``record.hea`` + ``record.dat``); returns the ``.hea``.

    Format 16 (little-endian int16, samples interleaved), gain 1000 adu/mV, baseline 0, age,
    sex, patient, date and report as header comments. The files are byte for byte what
    ``wfdb.wrsamp`` writes for the same arguments (the tests compare them), at a fraction of
    its per-record cost.
    """
    record.parent.mkdir(parents=True, exist_ok=True)
    comments = [f"Age: {age}", f"Sex: {'Male' if sex == 'M' else 'Female'}", f"Patient: {patient_id}",
                f"Date: {date.isoformat()}"]
    if report:
        comments.append("Dx: " + " ".join(report.split()))
    write_wfdb16(record, signal_mv, fs, lead_names, units="mV", gain=1000.0, comments=comments,
                 base_date=date, base_time=_dt.time(9, 0, 0))
    return record.with_suffix(".hea")


def write_wfdb16(record: Path, signal: np.ndarray, fs: float, sig_names, *, units: str, gain: float,
                 comments=(), base_date: _dt.date | None = None, base_time: _dt.time | None = None) -> None:
    """Write ``[C, T]`` physical values as a single-segment WFDB record in format 16, baseline 0.

    Digitisation, checksums and header text follow ``wfdb.wrsamp`` (``round(x * gain)``, NaN
    as -32768, checksum = sum of the samples modulo 65536, initial value = first sample).
    """
    x = np.asarray(signal, dtype=np.float64)
    digital = np.round(x * gain)
    digital[np.isnan(x)] = -32768
    if np.abs(digital).max(initial=0) > 32767 and not np.isnan(x).any():
        raise ValueError("signal exceeds the 16-bit range at this gain")
    d = digital.astype(np.int64)
    n_sig, n_samp = d.shape
    name = record.name
    fs_text = str(int(fs)) if round(float(fs), 8) == float(int(fs)) else str(float(fs))
    line = f"{name} {n_sig} {fs_text} {n_samp}"
    if base_time is not None:
        line += f" {base_time}"
    if base_date is not None:
        line += f" {base_date.strftime('%d/%m/%Y')}"
    lines = [line]
    init = d[:, 0] if n_samp else np.zeros(n_sig, np.int64)
    check = d.sum(axis=1) % 65536
    for k in range(n_sig):
        lines.append(f"{name}.dat 16 {float(gain)}(0)/{units} 16 0 {int(init[k])} {int(check[k])} 0 {sig_names[k]}")
    lines += [f"# {c}" for c in comments]
    record.with_suffix(".hea").write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")
    record.with_suffix(".dat").write_bytes(d.T.astype("<i2").tobytes())


def write_mri_nifti(folder: Path, volumes: dict[str, np.ndarray], spacing) -> Path:
    """Write ``{sequence: [Z, Y, X]}`` as ``folder/<sequence>.nii.gz`` with a RAS-style affine."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = (float(s) for s in spacing)
    for seq, vol in volumes.items():
        nz, ny, nx = vol.shape
        # voxel axes (i, j, k) run right->left, anterior->posterior, inferior->superior, so in
        # RAS+ world coordinates i and j point along -x and -y
        affine = np.diag([-sx, -sy, sz, 1.0])
        affine[:3, 3] = [sx * nx / 2, sy * ny / 2, -sz * nz / 2]
        img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)).round().clip(0, 32767).astype(np.int16), affine)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, folder / f"{seq}.nii.gz")
    return folder


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, optimize=False, compress_level=3)
    return path


def write_pyramidal_tiff(path: Path, rgb: np.ndarray, *, mpp: float, tile: int = 64, levels: int = 2,
                         description: str = "") -> Path:
    """Write an RGB slide as a tiled pyramidal TIFF: full resolution first, then ``levels``
    reductions by 2 as further reduced-resolution pages (``NewSubfileType=1``). OpenSlide's
    generic-tiff reader takes the page chain as the pyramid; tifffile reads it too."""
    import tifffile
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        opts = {"photometric": "rgb", "tile": (tile, tile), "compression": "zlib", "resolutionunit": "CENTIMETER"}
        tif.write(rgb, resolution=res, description=description or None, metadata=None, **opts)
        for lv in range(1, levels + 1):
            f = 2 ** lv
            small = np.asarray(Image.fromarray(rgb).resize((max(w // f, 1), max(h // f, 1)), Image.BILINEAR))
            tif.write(small, subfiletype=1, resolution=(res[0] / f, res[1] / f), metadata=None, **opts)
    return path
