"""server.tracing.control: Triton's trace settings, checked before they apply, per model over global, and the
tracer sampling by them at once (rate, level, count)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from server.errors import InvalidInput
from server.tracing.control import TRACE_ID_SPACE, TraceControl, rate_of

pytestmark = pytest.mark.unit


def test_reports_triton_shaped_settings() -> None:
    control = TraceControl(enabled=True, ratio=0.01)
    assert control.settings() == {
        "trace_level": ["TIMESTAMPS"],
        "trace_rate": "100",
        "trace_count": "-1",
        "log_frequency": "0",
        "trace_file": "",
        "trace_mode": "opentelemetry",
    }
    assert TraceControl(enabled=False).settings()["trace_level"] == ["OFF"]
    assert [rate_of(r) for r in (0.0, 1.0, 0.5, 0.3)] == ["0", "1", "2", "3"]


def test_a_models_settings_override_key_by_key_and_clear_back() -> None:
    control = TraceControl(enabled=True, ratio=1.0)
    control.update("a", {"trace_rate": "10"})
    control.update(None, {"trace_level": ["OFF"]})
    assert control.settings("a")["trace_rate"] == "10" and control.settings("a")["trace_level"] == ["OFF"]
    assert control.policy_for("a").ratio == 0.1 and not control.policy_for("a").on
    assert control.policy_for("b") is control.policy  # no settings of its own: the global policy
    assert control.settings("b")["trace_rate"] == "1"
    shown = control.update("a", {"trace_rate": None, "trace_level": ["TIMESTAMPS"]})
    assert shown["trace_rate"] == "1" and shown["trace_level"] == ["TIMESTAMPS"]
    assert control.policy_for("a").on and not control.policy_for("b").on
    control.update("a", {"trace_level": []})  # gRPC's empty value clears too
    assert control.policy_for("a") is control.policy


def test_the_count_counts_down_and_a_model_without_its_own_shares_the_global_one() -> None:
    control = TraceControl(enabled=True)
    control.update(None, {"trace_count": "2"})
    control.update("own", {"trace_count": ["1"]})
    control.update("shared", {"trace_rate": "1"})
    assert control.policy_for("shared").countdown.take() and control.policy.countdown.take()
    assert not control.policy_for("shared").countdown.take()  # the global two are spent
    assert control.settings()["trace_count"] == "0" and control.settings("own")["trace_count"] == "1"
    assert control.policy_for("own").countdown.take() and not control.policy_for("own").countdown.take()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"trace_level": ["TENSORS"]}, "TENSORS is not supported"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "trace_level"),
        ({"trace_level": 3}, "trace_level"),
        ({"trace_rate": "-1"}, "trace_rate: must be 0"),
        ({"trace_rate": "1.5"}, "trace_rate: expected an integer"),
        ({"trace_rate": True}, "trace_rate"),
        ({"trace_count": "-2"}, "trace_count"),
        ({"log_frequency": "10"}, "log_frequency: not used"),
        ({"trace_mode": "triton"}, "trace_mode"),
        ({"rate": "1"}, "'rate' is not known"),
        ({"trace_rate": None}, "only a model's setting can be cleared"),
        ({"trace_rate": "10", "trace_level": ["LOUD"]}, "trace_level"),
    ],
)
def test_bad_settings_name_the_field_and_change_nothing(changes: dict[str, Any], named: str) -> None:
    control = TraceControl(enabled=True, ratio=1.0)
    with pytest.raises(InvalidInput, match=named):
        control.update(None, changes)
    assert control.settings()["trace_rate"] == "1" and control.settings()["trace_level"] == ["TIMESTAMPS"]


def test_nothing_changes_when_tracing_is_off() -> None:
    with pytest.raises(InvalidInput, match="tracing is off; start the server with --tracing"):
        TraceControl(enabled=False).update(None, {"trace_rate": "1"})


def test_the_tracer_samples_by_the_settings_at_once() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from server.tracing import Tracer
    from server.tracing.sampling import RootSampler

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, id_generator=RootSampler(1.0))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = Tracer(provider)
    random.seed(5)

    def sampled(model: str, count: int, headers: dict[str, str] | None = None) -> int:
        traces = [tracer.start("http", model, "1", headers or {}) for _ in range(count)]
        for trace in traces:
            trace.finish()
        tracer.flush()
        return sum(trace.sampled for trace in traces)

    assert sampled("m", 50) == 50
    tracer.control.update("m", {"trace_rate": "10"})
    assert 250 <= sampled("m", 4000) <= 550  # binomial(4000, 0.1): mean 400, sd 19
    at_one_in_ten = exporter.get_finished_spans()[50:]
    assert all(s.context.trace_id % TRACE_ID_SPACE < TRACE_ID_SPACE // 10 for s in at_one_in_ten if s.context)
    assert sampled("other", 20) == 20
    caller = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    tracer.control.update("m", {"trace_level": ["OFF"]})
    assert sampled("m", 10, caller) == 0  # OFF: not even a caller's sampled request
    tracer.control.update("m", {"trace_level": ["TIMESTAMPS"], "trace_rate": "0", "trace_count": "2"})
    assert sampled("m", 10, caller) == 2  # rate 0 leaves a sampled caller to its flag; the count stops it
