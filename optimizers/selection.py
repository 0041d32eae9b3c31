"""Pick the fastest candidate that survived the guard. The current choice (the original model, or the
default session config) is kept unless a candidate's throughput at the preferred batch size beats it by
``min_gain``: the result is never slower than what it replaces, and timing noise never swaps a model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from optimizers.timing import Latencies, throughput


@dataclass
class Verdict:
    """The winner (None: keep the baseline) and a one-line reason for every candidate."""

    winner: str | None
    reasons: dict[str, str] = field(default_factory=dict)


def select_fastest(
    baseline: Latencies,
    candidates: Mapping[str, Latencies],
    batch: int,
    min_gain: float,
    baseline_name: str = "original",
    note: str = "passed the guard; ",
) -> Verdict:
    """Highest throughput at ``batch`` among candidates at least ``min_gain`` faster than the baseline."""
    base = throughput(baseline, batch)
    speeds = {name: throughput(latencies, batch) for name, latencies in candidates.items()}
    eligible = {name: speed for name, speed in speeds.items() if speed > 0 and speed >= base * (1 + min_gain)}
    winner = max(eligible, key=lambda name: eligible[name]) if eligible else None
    verdict = Verdict(winner)
    at = f"at batch {batch}"
    for name, latencies in candidates.items():
        mine = _ms(latencies, batch)
        if name == winner:
            verdict.reasons[name] = (
                f"fastest: {mine} vs {baseline_name} {_ms(baseline, batch)} {at} ({_ratio(speeds[name], base)})"
            )
        elif not speeds[name]:
            verdict.reasons[name] = f"not timed {at}"
        elif name in eligible and winner is not None:
            verdict.reasons[name] = f"{note}slower than {winner}: {mine} vs {_ms(candidates[winner], batch)} {at}"
        else:
            verdict.reasons[name] = (
                f"{note}not faster than {baseline_name}: {mine} vs {_ms(baseline, batch)} {at}"
                f" (needs {min_gain:.0%} more throughput)"
            )
    return verdict


def _ms(latencies: Latencies, batch: int) -> str:
    value = latencies.get(batch)
    return f"{value:.3f} ms" if value is not None else "?"


def _ratio(speed: float, base: float) -> str:
    return f"{speed / base:.2f}x" if base else "baseline not timed"
