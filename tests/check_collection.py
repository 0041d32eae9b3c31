"""Collect the test suite twice, in separate processes, and fail if the two runs disagree.

pytest-xdist collects the suite once per worker and refuses to run when the workers' lists differ ("Different
tests were collected between gw0 and gw1"). That happens when a test id depends on something that changes from
one process to the next: a bytes value holding a timestamp (gzip's header), random data, ``id()``, or the order
of a set of strings (hash randomization). This check reproduces it before the suite runs and names the ids.

The two runs differ in PYTHONHASHSEED and start times: the second starts after the first has finished, so a
timestamp in an id (one-second resolution, as in gzip's header) differs too.

Usage: ``python tests/check_collection.py [PYTEST ARGS...]`` (default ``tests``); ``make collect-check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOWN = 20


def collect(args: Sequence[str], hash_seed: str) -> list[str]:
    """Test ids from ``pytest --collect-only -q`` in a fresh process; exits with pytest's output on failure."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    if result.returncode != 0:
        listed = set(ids)
        sys.stderr.write("".join(line + "\n" for line in result.stdout.splitlines() if line not in listed))
        sys.stderr.write(result.stderr)
        sys.exit(f"check_collection: {' '.join(cmd)} failed with exit status {result.returncode}")
    return ids


def differences(first: list[str], second: list[str]) -> list[str]:
    """Human-readable lines describing how two collections differ; empty when they are identical."""
    if first == second:
        return []
    first_ids, second_ids = set(first), set(second)
    only_first = [item for item in first if item not in second_ids]
    only_second = [item for item in second if item not in first_ids]
    lines = []
    for label, items in (("only in the first run", only_first), ("only in the second run", only_second)):
        if items:
            lines.append(f"{len(items)} test id(s) {label}:")
            lines += [f"    {item}" for item in items[:SHOWN]]
            lines += [f"    ... and {len(items) - SHOWN} more"] if len(items) > SHOWN else []
    if not only_first and not only_second and len(first) == len(second):
        index = next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
        lines.append(f"same ids in a different order, first at position {index}: {first[index]} vs {second[index]}")
    elif not only_first and not only_second:
        lines.append(f"same ids, collected {len(first)} and {len(second)} times in all: some are duplicated")
    return lines


def main(argv: Sequence[str]) -> int:
    """Collect twice, compare, report."""
    args = list(argv) or ["tests"]
    started = time.monotonic()
    first = collect(args, "1")
    time.sleep(1.1)  # a timestamp with one-second resolution must differ between the runs
    second = collect(args, "2")
    problems = differences(first, second)
    if problems:
        print("check_collection: the test ids differ between two collections of the same suite.", file=sys.stderr)
        print(
            "pytest-xdist refuses such a suite: give the parametrize explicit ids=, fixed values or a sorted order.",
            file=sys.stderr,
        )
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"check_collection: {len(first)} test ids, identical in two runs ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
