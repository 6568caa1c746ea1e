"""``m3bind inspect PATH``: read any supported file or folder, describe it, optionally render it."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    """Register ``inspect`` on the ``m3bind`` parser."""
    from app.cli import add_common

    p = subparsers.add_parser("inspect", help="read a medical file or folder and describe it",
                              description="Read any supported file or folder (DICOM file or series, NIfTI, "
                                          "WFDB record, PNG/JPEG/TIFF, whole-slide image) and print what it holds.")
    p.add_argument("path", help="file or folder")
    p.add_argument("--preview", metavar="OUT.png", default=None, help="write a clinician-readable rendering")
    p.add_argument("--window", default=None,
                   help="CT/MRI window preset (lung, mediastinum, bone, brain) or CENTRE/WIDTH (write --window=-600/1500)")
    p.add_argument("--slice", type=int, default=None, help="slice index of a volume preview (default middle)")
    p.add_argument("--series", default=None, help="SeriesInstanceUID to read from a folder of several series")
    p.add_argument("--keep-phi", action="store_true", help="include patient identifiers in meta (DICOM)")
    add_common(p)
    p.set_defaults(func=run)


def _parse_window(text: str | None):
    if text is None or "/" not in text:
        return text
    c, w = text.split("/", 1)
    return float(c), float(w)


def run(args: argparse.Namespace) -> int:
    """Load ``args.path``, print its description, write the preview when asked."""
    from app.cli import emit
    from m3bind.io import load
    from m3bind.io.sample import json_meta
    from m3bind.render import save_preview

    opts = {"series": args.series} if args.series else {}
    sample = load(args.path, args.modality, keep_phi=args.keep_phi, **opts)
    payload = {
        "path": str(args.path),
        "modality": sample.modality,
        "format": sample.format,
        "shape": list(sample.shape),
        "spacing": list(sample.spacing) if sample.spacing else None,
        "meta": json_meta(sample.meta),
        "modality_guess": sample.modality_guess,
        "sampling_rate": sample.sampling_rate,
        "lead_names": sample.lead_names,
        "channel_names": sample.channel_names,
        "window": list(sample.window) if sample.window else None,
    }
    if sample.tiles is not None:
        payload["tiles"] = list(sample.tiles.shape)
    if args.preview:
        view_opts = {}
        if args.window is not None:
            view_opts["window"] = _parse_window(args.window)
        if args.slice is not None:
            view_opts["slice"] = args.slice
        save_preview(sample, args.preview, **view_opts)
        payload["preview"] = str(args.preview)
    human = [f"{args.path}", f"  modality  {sample.modality}{' (guessed)' if sample.modality_guess else ''}",
             f"  format    {sample.format}", f"  shape     {list(sample.shape)}"]
    if sample.spacing:
        human.append("  spacing   " + " x ".join(f"{s:.4g}" for s in sample.spacing) + " mm")
    if sample.sampling_rate:
        human.append(f"  sampling  {sample.sampling_rate:g} Hz, leads {', '.join(sample.lead_names or [])}")
    if sample.channel_names:
        human.append(f"  channels  {', '.join(sample.channel_names)}")
    if sample.tiles is not None:
        human.append(f"  tiles     {list(sample.tiles.shape)}")
    for k, v in payload["meta"].items():
        if k in ("phi", "coords", "comments") or isinstance(v, (dict, list)) and len(json.dumps(v)) > 120:
            continue
        human.append(f"  {k:<9} {v}")
    if args.preview:
        human.append(f"  preview   {args.preview}")
    emit(args, payload, "\n".join(human))
    return 0
