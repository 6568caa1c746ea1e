"""``python -m data_registry.synthetic --out DIR --patients N --seed S [--size tiny|small|full] [--workers W]``."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the cohort generator (shared with ``python -m data_registry synth``)."""
    p = argparse.ArgumentParser(prog="python -m data_registry.synthetic",
                                description="Write the simulated multimodal cohort and its manifest.csv.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the generator's options to ``p``."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--patients", type=int, default=1200, help="number of patients (default 1200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                   help="image sizes (default small; tiny = near the CPU demo's training resolution, fastest)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of patients in val")
    p.add_argument("--test-fraction", type=float, default=0.15, help="fraction of patients in the linked test split")
    p.add_argument("--paired-fraction", type=float, default=0.0,
                   help="fraction of train patients with a paired CXR+ECG (MEDBind edge loss; default 0)")
    p.add_argument("--signal", type=float, default=1.0, help="effect size multiplier (lower = harder)")
    p.add_argument("--noise", type=float, default=1.0, help="nuisance multiplier (higher = harder)")
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of wrongly annotated items")
    p.add_argument("--modalities", default=None, help="comma-separated subset of modalities")
    p.add_argument("--slide-format", choices=("tiff", "png"), default="tiff", help="pathology file format")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes (default 1; 0 = one per CPU core); output does not depend on it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the cohort described by parsed ``args``; prints the manifest path."""
    from m3bind.modalities import MODALITIES

    from .generate import generate

    kw = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
              "paired_fraction": args.paired_fraction, "signal": args.signal, "noise": args.noise,
              "label_noise": args.label_noise, "slide_format": args.slide_format,
              "workers": args.workers}
    if args.modalities:
        kw["modalities"] = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        bad = [m for m in kw["modalities"] if m not in MODALITIES]
        if bad:
            print(f"error: unknown modalities {bad} (known: {', '.join(MODALITIES)})", file=sys.stderr)
            return 2
    try:
        manifest = generate(args.out, args.patients, args.seed, args.size, progress=not args.quiet, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


def main(argv=None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
