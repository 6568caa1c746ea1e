"""Where m3bind's data comes from: the simulated cohort, real report text, public data sets,
and the study-archive catalogue.

Kept light on purpose: importing ``data_registry`` loads nothing heavy; the adapters load on
the first :func:`get`/:func:`list_datasets`, the cohort generator from
``data_registry.synthetic``, the archive code from ``data_registry.catalog``/``indexer``.

Example:
    >>> import data_registry
    >>> "ptbxl" in data_registry.list_datasets()
    True
"""

from __future__ import annotations

__all__ = ["DATASETS", "get", "list_datasets"]


def list_datasets() -> list[str]:
    """Names of the registered public data-set adapters, sorted."""
    from .datasets import DATASETS

    return DATASETS.names()


def get(name: str, root, **kw):
    """Open public data set ``name`` stored under ``root``.

    Args:
        name: A registered name (see :func:`list_datasets`).
        root: Folder holding the data set in its distributor's layout.
        **kw: Adapter options (``split``, ``seed``, and the adapter's own).

    Returns:
        A :class:`data_registry.datasets.base.MedicalDataset`.
    """
    from .datasets import DATASETS

    return DATASETS.get(name)(root, **kw)


def __getattr__(name):  # lazy re-export of the registry
    if name == "DATASETS":
        from .datasets import DATASETS

        return DATASETS
    raise AttributeError(name)
