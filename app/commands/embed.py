"""``m3bind embed PATH --model DIR``: embed one item into the shared space."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    """Register ``embed`` on the ``m3bind`` parser."""
    from app.cli import add_common

    p = subparsers.add_parser("embed", help="embed one file or folder with a model",
                              description="Read a medical file or folder and print its L2-normalised "
                                          "embedding in the model's shared space.")
    p.add_argument("path", help="file or folder")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and the item, print ``{"modality","dim","vector"}``."""
    from app.cli import emit
    from m3bind.io import load
    from m3bind.model import load_model

    model = load_model(args.model, device=args.device)
    sample = load(args.path, args.modality)
    vector = model.embed([sample])[0]
    payload = {"modality": sample.modality, "dim": int(vector.shape[0]),
               "vector": [float(v) for v in vector]}
    head = ", ".join(f"{v:+.4f}" for v in vector[:8])
    emit(args, payload, f"{sample.modality} embedding (dim {vector.shape[0]}, model {model.model_id}): [{head}, ...]")
    return 0
