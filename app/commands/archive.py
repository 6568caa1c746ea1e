"""``m3bind archive stats --catalog URL``: what an archive catalogue holds."""

from __future__ import annotations

import argparse

from app.cli import add_common, emit


def add_parser(subparsers) -> None:
    """Register ``m3bind archive`` and its ``stats`` verb."""
    p = subparsers.add_parser("archive", help="inspect an archive catalogue", description=__doc__)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    st = verbs.add_parser("stats", help="items per modality and failures")
    st.add_argument("--catalog", required=True, help="catalogue: SQLAlchemy URL or SQLite file path")
    add_common(st)
    st.set_defaults(func=stats)


def stats(args: argparse.Namespace) -> int:
    """Print ``{"items": {modality: N}, "failed": N, ...}``."""
    from data_registry.catalog import Catalog

    with Catalog(args.catalog, create=False) as cat:
        out = cat.stats()
    items = ", ".join(f"{m} {n}" for m, n in out["items"].items()) or "none"
    emit(args, out, f"items: {items}; duplicates {out['duplicates']}; failed {out['failed']}; "
                    f"patients {out['patients']}")
    return 0
