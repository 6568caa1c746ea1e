"""``m3bind index ROOT --catalog URL --model DIR``: index a study archive (incremental, resumable)."""

from __future__ import annotations

import argparse

from app.cli import add_common, emit


def add_parser(subparsers) -> None:
    """Register ``m3bind index``."""
    p = subparsers.add_parser("index", help="index a study archive into a catalogue",
                              description=__doc__)
    p.add_argument("path", metavar="ROOT", help="archive folder")
    p.add_argument("--catalog", required=True,
                   help="catalogue: SQLAlchemy URL or SQLite file path (created when missing)")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--workers", type=int, default=None,
                   help="decoder processes (default min(4, CPUs); 0 or 1 decodes inline)")
    p.add_argument("--batch-size", type=int, default=32, help="items embedded and committed together")
    p.add_argument("--keep-phi", action="store_true",
                   help="store patient names and birth dates (new catalogues only; off by default)")
    p.add_argument("--no-zeroshot", action="store_true", help="do not store zero-shot label scores")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Index ``args.path``; print the counts."""
    from data_registry.indexer import index_archive

    result = index_archive(args.path, args.catalog, args.model, workers=args.workers,
                           batch_size=args.batch_size, modality=args.modality,
                           keep_phi=True if args.keep_phi else None,
                           zeroshot=not args.no_zeroshot, progress=not args.json or None)
    payload = {k: result[k] for k in ("added", "skipped", "failed", "total")}
    payload.update({k: v for k, v in result.items() if k not in payload})
    human = (f"added {result['added']}, skipped {result['skipped']} "
             f"({result['duplicates']} duplicates), failed {result['failed']}, "
             f"total {result['total']}, removed {result['removed']}")
    emit(args, payload, human)
    return 0
