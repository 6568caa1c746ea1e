"""Public data-set adapters, one module per data set, registered by name in :data:`DATASETS`.

Importing this package imports every adapter module (they import only the standard library
and NumPy at import time; pandas, h5py and the readers load when a data set is opened).
"""

from . import (  # noqa: F401
               brats,
               camelyon,
               chexpert,
               covidx,
               cpsc2018,
               ct_rate,
               messidor,
               mimic_cxr,
               mimic_ecg,
               mimic_pair,
               odir,
               padchest,
               ptbxl,
               quilt,
               rad_chestct,
               rsna_pneumonia,
               sicapv2,
               skincancer,
)
from .base import DATASETS, DatasetLayoutError, MedicalDataset, Record, hash_split

__all__ = ["DATASETS", "DatasetLayoutError", "MedicalDataset", "Record", "hash_split"]
