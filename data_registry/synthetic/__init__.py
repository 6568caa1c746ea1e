"""The simulated multimodal cohort: the embedded default data set of m3bind.

Patients with systemic conditions that show in several organs, rendered per modality into
real file formats (DICOM CXR and CT series, WFDB ECG, NIfTI MRI, PNG fundus, pyramidal TIFF
slides) with free-text reports and a ``manifest.csv``. Train/val patients contribute one
modality each (no image-to-image pairs); ``test`` patients are linked (all modalities).

Example:
    >>> from data_registry.synthetic import generate, read_manifest
    >>> manifest = generate("/tmp/cohort", patients=50, seed=0)   # doctest: +SKIP
    >>> rows = read_manifest("/tmp/cohort")                          # doctest: +SKIP
"""

from .cohort import (
                     CONDITIONS,
                     FINDINGS,
                     HEALTHY,
                     condition_set,
                     label_for,
                     primary_condition,
                     same_condition,
)
from .generate import (
                     MANIFEST_COLUMNS,
                     SIZES,
                     CohortConfig,
                     chance_levels,
                     cross_modal_chance,
                     generate,
                     read_manifest,
)

__all__ = [
                     "CONDITIONS",
                     "FINDINGS",
                     "HEALTHY",
                     "MANIFEST_COLUMNS",
                     "SIZES",
                     "CohortConfig",
                     "chance_levels",
                     "condition_set",
                     "cross_modal_chance",
                     "generate",
                     "label_for",
                     "primary_condition",
                     "read_manifest",
                     "same_condition",
]
