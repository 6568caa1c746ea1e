"""``m3bind zeroshot PATH --model DIR --labels "a,b,c"``: zero-shot labels of one item."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    """Register ``zeroshot`` on the ``m3bind`` parser."""
    from app.cli import add_common
    from m3bind.zeroshot import MODES

    p = subparsers.add_parser("zeroshot", help="zero-shot classify one file or folder",
                              description="Score labels for one item by the similarity of its embedding to "
                                          "the labels' prompt embeddings (softmax with the model's logit scale).")
    p.add_argument("path", help="file or folder")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--labels", default=None,
                   help='comma-separated labels (default: the modality\'s labels, or those of --prompts)')
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="YAML/JSON file {label: [prompt, ...]} giving each label's prompts")
    p.add_argument("--mode", choices=MODES, default="ensemble",
                   help="ensemble: prompt templates (CLIP); expert: label descriptions (FLAIR); naive: label only")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print ``{"modality","labels":[{"label","score"}]}``, best first."""
    from app.cli import emit
    from m3bind.io import load
    from m3bind.model import load_model
    from m3bind.zeroshot import classify, load_prompt_file, parse_labels

    model = load_model(args.model, device=args.device)
    prompts = load_prompt_file(args.prompts) if args.prompts else None
    labels = parse_labels(args.labels)
    sample = load(args.path, args.modality)
    ranked = classify(model, sample, labels=labels, modality=sample.modality, mode=args.mode, prompts=prompts)
    payload = {"modality": sample.modality, "labels": [{"label": lab, "score": s} for lab, s in ranked]}
    width = max(len(lab) for lab, _ in ranked)
    human = "\n".join(f"{lab:<{width}}  {s:.3f}" for lab, s in ranked)
    emit(args, payload, f"{sample.modality} ({model.model_id})\n{human}")
    return 0
