"""Summarise the fuzzing campaigns (``benchmarks/results/fuzz_<reader>.json``) as a Markdown table.

Executions and outcomes are split by harness version (:data:`fuzz.fuzz_readers.HARNESS`): the
rates of harness 2 are per wall-clock second (on a shared, loaded machine) and per CPU second
of the worker (what the reader and the mutations cost, whatever the load)::

    python -m fuzz.summary [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from fuzz.fuzz_readers import HARNESS, READERS


def summarise(d: dict) -> dict:
    """Totals, the current harness's share (executions, rates, load, outcomes) and failures."""
    cur = [c for c in d.get("chunks", []) if c.get("harness") == HARNESS]
    execs = sum(c["execs"] for c in cur)
    wall = sum(c.get("wall_s", 0.0) for c in cur)
    cpu = sum(c.get("cpu_s", 0.0) for c in cur)
    outcomes: Counter = Counter()
    for c in cur:
        outcomes.update(c.get("outcomes", {}))
    loads = [c["loadavg"][0] for c in cur if c.get("loadavg")]
    return {
        "execs": d.get("execs", 0), "execs_now": execs,
        "per_wall_s": round(execs / wall, 1) if wall else None,
        "per_cpu_s": round(execs / cpu, 1) if cpu else None,
        "load": (round(min(loads), 1), round(max(loads), 1)) if loads else None,
        "outcomes_now": dict(outcomes), "unique_failures": d.get("n_unique_failures", 0),
        "failures_now": sum(v for k, v in outcomes.items() if k not in ("ok", "rejected")),
    }


def table(results: Path) -> str:
    rows = [("| reader | executions (all) | of which harness 2 | exec/s wall | exec/s per CPU s | load avg (1 min) "
             "| ok | rejected | failures (harness 2) | unique failures (all time) |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in READERS:
        f = results / f"fuzz_{r}.json"
        if not f.exists():
            continue
        s = summarise(json.loads(f.read_text()))
        o = s["outcomes_now"]
        load = f"{s['load'][0]}-{s['load'][1]}" if s["load"] else "-"
        rows.append(f"| {r} | {s['execs']:,} | {s['execs_now']:,} | {s['per_wall_s']} | {s['per_cpu_s']} | {load} "
                    f"| {o.get('ok', 0):,} | {o.get('rejected', 0):,} | {s['failures_now']} | {s['unique_failures']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    sys.stdout.write(table(args.results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
