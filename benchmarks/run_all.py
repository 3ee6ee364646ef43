"""Run every benchmark script, one after the other (``make bench-quick`` runs ``--quick``).

One at a time on purpose: each engine-backed script starts its own vLLM engine (about
6.5 GB), and two at once would fight over the machine's 2 cores and memory. The exit
status is 0 only if every script finished and wrote its JSON, so CI can gate on it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from common import BENCH_DIR, result_path

SCRIPTS = (
    "prefix_cache_gain",
    "time_to_verdict",
    "block_alignment",
    "client_overhead",
    "clock_honesty",
    "scale",
    "ttft_false_positive",
    "routing",
    "history_reuse",
)
"""Every benchmark, in priority order."""

NOT_IN_QUICK = ("time_to_verdict", "routing")
"""Left out of ``--quick`` (the CI gate), to keep ``make test`` within its hour: ``routing``
starts a fleet of two engines, and ``time_to_verdict`` repeats the old design's full test.
Both were seen through at ee55844 (``results/time_to_verdict.json``, ``results/routing-quick.json``);
``--only`` runs them."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scripts (all, or those named), print one status line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each script's --quick mode (a few minutes each)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these")
    args = parser.parse_args(argv)
    chosen = args.only or [s for s in SCRIPTS if not (args.quick and s in NOT_IN_QUICK)]
    status: list[tuple[str, int, float]] = []
    for name in chosen:
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(["--quick"] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        if code == 0 and not result_path(name, args.quick).exists():
            code = 1
        status.append((name, code, time.perf_counter() - start))
    print("\nbenchmarks:")
    for name, code, seconds in status:
        mark = "ok  " if code == 0 else "FAIL"
        print(f"  {mark} {name:18} {seconds:6.0f} s  -> {result_path(name, args.quick)}")
    return 0 if all(code == 0 for _, code, _ in status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
