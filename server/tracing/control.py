"""Triton's trace extension: the trace settings a client reads and changes while the server runs.

``GET/POST /v2/trace/setting`` and ``/v2/models/{model}/trace/setting`` on HTTP, the ``TraceSetting`` RPC on
gRPC (tritonclient's ``get_trace_settings`` / ``update_trace_settings``). The settings steer the OpenTelemetry
tracing configured at start (server/tracing/__init__.py); they cannot turn on a tracer that was not started.

- ``trace_level``: ``["TIMESTAMPS"]`` (trace) or ``["OFF"]`` (trace nothing, not even requests whose caller
  sampled them). ``TENSORS`` is refused: spans carry timestamps, never tensor data.
- ``trace_rate``: trace 1 in N root requests, N ≥ 0 (0: none). Triton counts requests; here it is the ratio
  1/N applied to the trace id, the OpenTelemetry ratio rule, so sampling stays consistent across services. A
  request with a ``traceparent`` follows its caller's flag under the ``parentbased_*`` samplers, as before.
- ``trace_count``: how many more requests to trace (-1: no limit); it counts down and GET shows what is left.
- ``log_frequency`` and ``trace_file`` belong to Triton's file mode and are refused; ``trace_mode`` reads
  ``opentelemetry``.

A model's settings override the global ones key by key; ``null`` (HTTP) or an empty value (gRPC) clears a
model's key so it follows the global one again. A model without its own ``trace_count`` shares the global count.
Starting values come from OTEL_TRACES_SAMPLER[_ARG]. Why at run time: an operator turns tracing up on one model
while chasing a slow request and down again, without a restart; and a benchmark can compare tracing's cost
inside one process (BENCHMARKS.md §11).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidInput

TRACE_ID_SPACE = 2**64
"""The low 64 bits of a trace id decide a ratio sample (OpenTelemetry's TraceIdRatioBased rule)."""

LEVELS = ("OFF", "TIMESTAMPS")
UPDATABLE = ("trace_level", "trace_rate", "trace_count")
FILE_MODE_ONLY = ("log_frequency", "trace_file")
KNOWN = (*UPDATABLE, *FILE_MODE_ONLY, "trace_mode")

SettingValue = str | list[str]


class Countdown:
    """``trace_count``: requests still to trace; -1 for no limit. Shared by every policy that uses it."""

    def __init__(self, left: int) -> None:
        self.left = left
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Count one traced request; False when none are left."""
        if self.left < 0:
            return True
        with self._lock:
            if self.left == 0:
                return False
            self.left -= 1
            return True


@dataclass(frozen=True)
class Policy:
    """What the tracer applies to one model's requests (read on every request: a frozen object, swapped whole)."""

    on: bool
    ratio: float
    countdown: Countdown

    @property
    def bound(self) -> int:
        """Trace ids whose low 64 bits fall below this are sampled."""
        return round(self.ratio * TRACE_ID_SPACE)


def rate_of(ratio: float) -> str:
    """A ratio as Triton's trace_rate (1 in N); a ratio that is not 1/N shows rounded."""
    return "0" if ratio <= 0 else str(max(1, round(1 / ratio)))


class TraceControl:
    """The global and per-model trace settings, and the policy each model's requests get."""

    def __init__(self, *, enabled: bool, ratio: float = 1.0, rate_settable: bool = True) -> None:
        """``enabled``: tracing was started; ``ratio``: the root sampling ratio it started with;
        ``rate_settable``: False when a sampler other than the standard ones decides (trace_rate is then its)."""
        self.enabled = enabled
        self.rate_settable = rate_settable
        self._lock = threading.Lock()
        self._global: dict[str, Any] = {"trace_level": "TIMESTAMPS", "trace_rate": ratio, "trace_count": Countdown(-1)}
        self._models: dict[str, dict[str, Any]] = {}
        self.policy = self._policy(self._global)
        self._policies: dict[str, Policy] = {}

    def policy_for(self, model: str) -> Policy:
        """The policy for a request to ``model`` (the hot path: one dict look-up)."""
        return self._policies.get(model, self.policy)

    def settings(self, model: str | None = None) -> dict[str, SettingValue]:
        """The settings in force, as Triton reports them (strings; trace_level a list)."""
        values = self._values(model)
        level = values["trace_level"] if self.enabled else "OFF"
        return {
            "trace_level": [level],
            "trace_rate": rate_of(values["trace_rate"]),
            "trace_count": str(values["trace_count"].left),
            "log_frequency": "0",
            "trace_file": "",
            "trace_mode": "opentelemetry",
        }

    def update(self, model: str | None, changes: Mapping[str, SettingValue | None]) -> dict[str, SettingValue]:
        """Apply ``changes`` (all checked before any applies) and return the settings now in force."""
        parsed = {key: self._parse(key, value, model) for key, value in changes.items()}
        with self._lock:
            target = self._global if model is None else self._models.setdefault(model, {})
            for key, value in parsed.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
            if model is not None and not target:
                del self._models[model]
            self.policy = self._policy(self._global)
            self._policies = {name: self._policy(self._global | own) for name, own in self._models.items()}
        return self.settings(model)

    def _values(self, model: str | None) -> dict[str, Any]:
        with self._lock:
            return self._global | (self._models.get(model, {}) if model is not None else {})

    def _policy(self, values: Mapping[str, Any]) -> Policy:
        return Policy(values["trace_level"] == "TIMESTAMPS", values["trace_rate"], values["trace_count"])

    def _parse(self, key: str, value: SettingValue | None, model: str | None) -> Any:
        """One setting from the wire, checked; None clears a model's own value."""
        self._check_key(key)
        if value is None or value == []:
            if model is None:
                raise InvalidInput(f"{key}: only a model's setting can be cleared; the global one needs a value")
            return None
        if key == "trace_level":
            return _level(value)
        if key == "trace_rate":
            return _ratio(value)
        return _countdown(value)

    def _check_key(self, key: str) -> None:
        if key not in KNOWN:
            raise InvalidInput(f"trace setting {key!r} is not known; the settings are {', '.join(KNOWN)}")
        if key in FILE_MODE_ONLY:
            raise InvalidInput(f"{key}: not used, optiserve exports traces over OpenTelemetry (trace_mode)")
        if key == "trace_mode":
            raise InvalidInput("trace_mode: fixed at 'opentelemetry', it cannot be changed")
        if not self.enabled:
            raise InvalidInput(f"{key}: tracing is off; start the server with --tracing or OTEL_TRACES_EXPORTER")
        if key == "trace_rate" and not self.rate_settable:
            raise InvalidInput("trace_rate: OTEL_TRACES_SAMPLER names a sampler that decides sampling itself")


def _level(value: SettingValue) -> str:
    levels = [value] if isinstance(value, str) else value
    if not isinstance(levels, list) or len(levels) != 1 or levels[0] not in LEVELS:
        tensors = isinstance(levels, list) and "TENSORS" in levels
        hint = " (TENSORS is not supported: spans carry timestamps only)" if tensors else ""
        raise InvalidInput(f'trace_level: expected ["OFF"] or ["TIMESTAMPS"], got {value!r}{hint}')
    return levels[0]


def _ratio(value: SettingValue) -> float:
    number = _integer("trace_rate", value)
    if number < 0:
        raise InvalidInput(f"trace_rate: must be 0 (none) or more, got {number}")
    return 0.0 if number == 0 else 1 / number


def _countdown(value: SettingValue) -> Countdown:
    number = _integer("trace_count", value)
    if number < -1:
        raise InvalidInput(f"trace_count: must be -1 (no limit) or more, got {number}")
    return Countdown(number)


def _integer(key: str, value: SettingValue) -> int:
    """An integer setting sent as a string (Triton's form), a one-string list (gRPC) or a JSON number."""
    text = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise InvalidInput(f"{key}: expected an integer as a string, got {value!r}")
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{key}: expected an integer, got {text!r}") from None
