"""How request outcomes become metrics: every error class names a known failure reason (so a new error
cannot fall outside the failure counter's buckets), every request counts in requests_total, and failures
before a model version was found count under model="" without a series per client-supplied name."""

from __future__ import annotations

import asyncio

import pytest

from server import errors
from server.errors import ClientGone, failure_reason
from server.metrics import FAILURE_REASONS, ServerMetrics
from server.models.batching import BatcherClosed


@pytest.mark.parametrize("cls", errors.all_error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_has_a_known_failure_reason(cls: type[errors.ServerError]) -> None:
    assert failure_reason(cls("boom")) in FAILURE_REASONS


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (errors.InvalidInput("shape"), "invalid"),
        (errors.PayloadTooLarge("big"), "invalid"),
        (errors.ModelNotFound("ghost"), "not_found"),
        (errors.ServerUnavailable("full"), "rejected"),
        (errors.DeadlineExceeded("late"), "rejected"),
        (errors.ModelNotReady("loading"), "rejected"),
        (BatcherClosed("swapped"), "rejected"),
        (errors.InternalError("bug"), "backend"),
        (RuntimeError("onnxruntime"), "backend"),
        (asyncio.CancelledError(), "canceled"),
        (ClientGone("gone"), "canceled"),
        (errors.Unauthenticated("who"), "other"),
    ],
)
def test_failure_reasons(exc: BaseException, reason: str) -> None:
    assert failure_reason(exc) == reason


def _value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return float(metrics.registry.get_sample_value(name, labels) or 0.0)


def test_requests_total_counts_every_outcome() -> None:
    metrics = ServerMetrics()
    bound = metrics.for_version("m", "1")
    assert bound is not None
    bound.observe_request(None, 1000)
    bound.observe_request("invalid", 1000)
    bound.observe_request("no-such-reason", 1000)
    ids = {"model": "m", "version": "1"}
    assert _value(metrics, "optiserve_inference_requests_total", **ids) == 3
    assert _value(metrics, "optiserve_inference_failures_total", **ids, reason="invalid") == 1
    assert _value(metrics, "optiserve_inference_failures_total", **ids, reason="other") == 1
    assert _value(metrics, "optiserve_request_duration_seconds_count", **ids) == 3


def test_unrouted_failures_count_under_an_empty_model() -> None:
    metrics = ServerMetrics()
    unrouted = metrics.for_unrouted()
    assert unrouted is not None
    # Bound up front: the series exist (at 0) before the first failure, so rate() sees the first one.
    assert metrics.registry.get_sample_value("optiserve_inference_requests_total", {"model": "", "version": ""}) == 0
    unrouted.count("not_found")
    unrouted.count("rejected")
    empty = {"model": "", "version": ""}
    assert _value(metrics, "optiserve_inference_requests_total", **empty) == 2
    assert _value(metrics, "optiserve_inference_failures_total", **empty, reason="not_found") == 1
    assert ServerMetrics(enabled=False).for_unrouted() is None
