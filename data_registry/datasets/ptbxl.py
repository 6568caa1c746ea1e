"""PTB-XL (v1.0.3): 21,799 clinical 12-lead ECGs from 18,869 patients.

Citation: Wagner P, Strodthoff N, Bousseljot RD, et al. PTB-XL, a large publicly available
electrocardiography dataset. Sci Data 7, 154 (2020). Superclass task as in Strodthoff N et al.,
Deep learning for ECG analysis: benchmarks and insights from PTB-XL, IEEE JBHI 2021.

Layout (PhysioNet)::

    root/ptbxl_database.csv   ecg_id, patient_id, age, sex, report, scp_codes ("{'NORM': 100.0}"), strat_fold, filename_lr, filename_hr
    root/scp_statements.csv   (index: SCP code), diagnostic, diagnostic_class, ...
    root/records500/00000/00001_hr.hea, root/records100/00000/00001_lr.hea
"""

from __future__ import annotations

import ast

from .base import DATASETS, MedicalDataset, Record, read_csv

SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")


def fold_split(fold: int) -> str:
    """The recommended PTB-XL split: folds 1-8 train, 9 validation, 10 test (patient-disjoint)."""
    return "test" if fold == 10 else "val" if fold == 9 else "train"


@DATASETS.register("ptbxl")
class PTBXL(MedicalDataset):
    """PTB-XL diagnostic superclasses (multi-label, every diagnostic SCP code counts whatever its
    likelihood, as in the benchmark), with the cardiologist's report text.

    Args:
        root: Data set root.
        split: By ``strat_fold`` (see :func:`fold_split`).
        sampling_rate: 500 (``records500``) or 100 (``records100``).
    """

    name, modality, labels, has_reports = "ptbxl", "ecg", SUPERCLASSES, True
    citation = "Wagner et al., PTB-XL, Sci Data 2020"
    url = "https://physionet.org/content/ptb-xl/1.0.3/"

    def __init__(self, root, split: str = "all", *, sampling_rate: int = 500, **kw):
        if sampling_rate not in (100, 500):
            raise ValueError("sampling_rate must be 100 or 500")
        self.sampling_rate = sampling_rate
        super().__init__(root, split, **kw)

    def _scan(self):
        db = read_csv(self._require("ptbxl_database.csv"), dtype=str).fillna("")
        scp = read_csv(self._require("scp_statements.csv"), index_col=0, dtype=str).fillna("")
        diag = {code: row["diagnostic_class"] for code, row in scp.iterrows()
                if row.get("diagnostic", "") not in ("", "0", "0.0") and row.get("diagnostic_class", "")}
        col = "filename_hr" if self.sampling_rate == 500 else "filename_lr"
        for r in db.to_dict("records"):
            codes = ast.literal_eval(r["scp_codes"]) if r["scp_codes"] else {}
            present = {diag[c] for c in codes if c in diag}
            yield Record(path=self.root / (r[col] + ".hea"), patient=str(int(float(r["patient_id"]))),
                         study=r["ecg_id"], report=r.get("report") or None,
                         labels=self._vector({k: float(k in present) for k in self.labels}),
                         split=fold_split(int(float(r["strat_fold"]))),
                         meta={"scp_codes": codes, "age": r.get("age", ""), "sex": r.get("sex", "")})
