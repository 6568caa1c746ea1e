"""What the benchmark scripts share: writing a result file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_results(out: dict[str, Any], path: Path) -> None:
    """Write ``out`` as indented JSON to ``path`` (its folder created) and print it to stdout,
    the benchmarks' closing step (the printed copy is what a caller piping the script reads)."""
    text = json.dumps(out, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    log.info("wrote %s", path)
