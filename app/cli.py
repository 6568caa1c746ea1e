"""The ``m3bind`` command: one subcommand module per verb under ``app/commands/``.

Each command module exposes ``add_parser(subparsers)`` (which registers its parser and sets
``func``) and is listed in :data:`COMMANDS`. Errors never show a traceback: a user-facing
:class:`~m3bind.errors.M3BindError` prints ``error: <what> (<path>)`` on stderr and exits 2;
``--debug`` re-raises instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from m3bind.errors import M3BindError

#: Subcommand modules, in help order. A module that fails to import is skipped with a warning,
#: so one broken optional dependency never takes the whole CLI down.
COMMANDS = ("inspect", "embed", "zeroshot", "index", "search", "archive", "serve")

log = logging.getLogger("m3bind")


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every subcommand accepts."""
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--modality", default=None,
                   help="modality of formats that carry none (cxr, ct, retina, ecg, pathology, mri)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    """Print ``payload`` as JSON with ``--json``, else the human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, ensure_ascii=False))
    else:
        print(human)


def fail(message: str) -> int:
    """Print the one-line error and return exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3bind",
        description="Bind medical modalities into one embedding space through text; explore a study archive.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"app.commands.{name}")
        except ImportError as e:  # pragma: no cover - only with a broken install
            log.warning("command %s unavailable: %s", name, e)
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``m3bind`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0), 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except M3BindError as e:
        if args.debug:
            raise
        return fail(e.line())
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as e:  # noqa: BLE001 - the contract is one line, never a traceback
        if args.debug:
            raise
        target = getattr(args, "path", None) or getattr(args, "query", None) or ""
        suffix = f" ({target})" if target else ""
        return fail(f"{type(e).__name__}: {' '.join(str(e).split())}{suffix}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
