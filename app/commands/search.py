"""``m3bind search QUERY --catalog URL --model DIR --target MODALITY -k K``: search an archive.

QUERY is a file or folder, or ``text:<free text>``.
"""

from __future__ import annotations

import argparse

from app.cli import add_common, emit
from m3bind.modalities import MODALITIES


def add_parser(subparsers) -> None:
    """Register ``m3bind search``."""
    p = subparsers.add_parser("search", help="search an indexed archive by file or text",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("query", metavar="QUERY", help="a file or folder, or text:<free text>")
    p.add_argument("--catalog", required=True, help="catalogue: SQLAlchemy URL or SQLite file path")
    p.add_argument("--model", required=True, help="model directory the archive was indexed with")
    p.add_argument("--target", required=True, choices=MODALITIES, help="modality to search")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--from", dest="date_from", default=None, help="earliest study date (ISO)")
    p.add_argument("--to", dest="date_to", default=None, help="latest study date (ISO)")
    p.add_argument("--patient", default=None, help="patient (pseudonymous key or patient id)")
    p.add_argument("--study", default=None, help="study (pseudonymous key or study identifier)")
    p.add_argument("--same-patient", action="store_true",
                   help="only the query item's patient (query must be in the archive)")
    p.add_argument("--nearest-in-time", action="store_true",
                   help="with --same-patient: order by time from the query's study")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the search; print the results."""
    from data_registry.search import search

    out = search(args.catalog, args.model, args.query, args.target, args.k,
                 modality=args.modality, date_from=args.date_from, date_to=args.date_to,
                 patient=args.patient, study=args.study, same_patient=args.same_patient,
                 nearest_in_time=args.nearest_in_time)
    lines = [f"{r['score']:+.3f}  {r['modality']:<9} {r['path']}  patient={r['patient'] or '-'}"
             f" study={r['study'] or '-'} date={r['study_date'] or '-'}" for r in out["results"]]
    emit(args, out, "\n".join(lines) if lines else "no results")
    return 0
