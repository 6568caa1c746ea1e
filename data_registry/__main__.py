"""``python -m data_registry list`` and ``python -m data_registry synth --out DIR ...``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    """Command-line entry point."""
    from .synthetic.__main__ import add_arguments, run

    p = argparse.ArgumentParser(prog="python -m data_registry", description="m3bind data sources")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list the public data-set adapters")
    ls.add_argument("--verbose", "-v", action="store_true", help="show modality, labels and citation")
    syn = sub.add_parser("synth", help="generate the simulated cohort")
    add_arguments(syn)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        from .datasets import DATASETS

        for name in DATASETS.names():
            cls = DATASETS.get(name)
            if args.verbose:
                print(f"{name}\t{cls.modality}\t{len(cls.labels)} labels\t{cls.citation}")
            else:
                print(name)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
