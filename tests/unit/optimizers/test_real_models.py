"""Failure classes seen on public pretrained models, on small synthetic models of the same shape: weights in
Constant nodes, inputs whose dynamic sizes must be searched for, a quantizer that raises on one setting."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizers import OptimizeOptions, Pipeline
from optimizers.modelinfo import analyze, analyze_model, normalize
from optimizers.passes.base import ModelPass
from optimizers.passes.int8_dynamic import Int8DynamicPass
from optimizers.passes.int8_static import Int8StaticPass
from optimizers.reference import MAX_ATTEMPTS, NoRunnableInputs, build_reference
from optimizers.runtime import Feed
from tests.models.fixtures import _model
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, context, fake_device


def test_constant_node_weights_count_as_weights_and_the_input_is_untouched() -> None:
    model = models.constant_weights(models.conv_net())
    before = model.SerializeToString()
    normalized, folded = normalize(model)
    assert folded == 6 and not any(node.op_type == "Constant" for node in normalized.graph.node)
    assert len(normalized.graph.initializer) == 6
    assert model.SerializeToString() == before  # normalized on a copy
    info = analyze_model(model)
    assert info.weight_params == analyze_model(models.conv_net()).weight_params
    assert info.has_float_weights and "Constant" not in info.op_counts


def _quantized_ops(folder: Path, model: onnx.ModelProto, quant: ModelPass[Any]) -> Counter[str]:
    source = models.save(models.constant_weights(model), folder)
    ctx = context(source)
    assert analyze(source).has_float_weights
    config = quant.configure(ctx)
    assert quant.skip_reason(ctx, config) is None
    target = folder / "out.onnx"
    quant.apply(source, target, config, ctx)
    return Counter(node.op_type for node in onnx.load(str(target)).graph.node)


def test_constant_node_weights_are_quantized(tmp_path: Path) -> None:
    assert _quantized_ops(tmp_path / "conv", models.conv_net(), Int8StaticPass())["QuantizeLinear"] >= 1
    mlp = models.trained_digits().model
    assert _quantized_ops(tmp_path / "mlp", mlp, Int8DynamicPass())["MatMulInteger"] >= 1


TRUTH_VALUE = "The truth value of an array with more than one element is ambiguous. Use a.any() or a.all()"


def _failing_quantizer(
    monkeypatch: pytest.MonkeyPatch, name: str, fails: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Replace onnxruntime's ``name`` quantizer with one that raises like ``_adjust_weight_scale_for_int32_bias``
    does on some real models whenever ``fails(kwargs)``; returns the calls' keyword arguments."""
    import onnxruntime.quantization as quantization

    real = getattr(quantization, name)
    calls: list[dict[str, Any]] = []

    def quantize(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        if fails(kwargs):
            raise ValueError(TRUTH_VALUE)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantization, name, quantize)
    return calls


def _adjusts_bias(kwargs: dict[str, Any]) -> bool:
    return not kwargs["extra_options"].get("QDQDisableWeightAdjustForInt32Bias", False)


def test_a_failing_quantizer_setting_falls_back_to_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _failing_quantizer(monkeypatch, "quantize_static", _adjusts_bias)
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    details = quant.apply(source, tmp_path / "qdq.onnx", quant.configure(ctx), ctx)
    assert details["quantizer_setting"] == "no_int32_bias_weight_adjust"
    assert [a["setting"] for a in details["quantizer_attempts"]] == [
        "configured",
        "per_tensor",
        "no_int32_bias_weight_adjust",
    ]
    assert "truth value" in details["quantizer_attempts"][0]["error"]
    assert [c["per_channel"] for c in calls] == [True, False, False]
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(tmp_path / "qdq.onnx")).graph.node}


def test_biased_nodes_are_excluded_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_quantizer(monkeypatch, "quantize_static", lambda kwargs: not kwargs["nodes_to_exclude"])
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    details = quant.apply(source, tmp_path / "qdq.onnx", quant.configure(ctx), ctx)
    assert details["quantizer_setting"] == "exclude_biased_nodes"
    assert details["quantizer_attempts"][-1]["excluded_nodes"] == 3  # two Convs and the Gemm


def test_every_setting_failing_rejects_the_step_with_each_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_quantizer(monkeypatch, "quantize_dynamic", lambda kwargs: True)
    digits = models.save(models.trained_digits().model, tmp_path / "digits")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark())
    steps = {step["name"]: step for step in pipeline.run(digits, OptimizeOptions()).report["steps"]}
    reason = steps["int8_dynamic"]["reason"]
    assert steps["int8_dynamic"]["status"] == "rejected"
    assert "every setting" in reason and "configured: ValueError" in reason and "exclude_biased_nodes" in reason


def _report(tmp_path: Path, model: onnx.ModelProto, options: OptimizeOptions | None = None) -> dict[str, Any]:
    path = models.save(model, tmp_path / "model")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark({"int8_static": 4.0}))
    report: dict[str, Any] = pipeline.run(path, options or OptimizeOptions()).report
    return report


def _tried(report: dict[str, Any], name: str) -> dict[str, Any]:
    step: dict[str, Any] = next(s for s in report["steps"] if s["name"] == name)
    assert step["status"] != "skipped", step["reason"]
    return step


def test_a_detector_that_runs_only_at_multiples_of_32_gets_a_reference(tmp_path: Path) -> None:
    report = _report(tmp_path, models.stride_detector())
    reference = report["reference"]
    assert reference["source"] == "search" and reference["count"] == 32
    first, last = reference["attempts"][0], reference["attempts"][-1]
    assert first["source"] == "random" and "Concat" in first["error"]
    assert last == {"source": "search", "shapes": {"image": [1, 3, 32, 32]}, "error": None}
    assert _tried(report, "int8_static")["status"] == "applied"


def test_config_dims_come_first(tmp_path: Path) -> None:
    options = OptimizeOptions(input_shapes={"image": [3, 64, -1]})
    reference = _report(tmp_path, models.stride_detector(), options)["reference"]
    assert reference["source"] == "config"
    assert [a["shapes"]["image"] for a in reference["attempts"]] == [[1, 3, 64, 8], [1, 3, 64, 32]]


def test_a_stateful_audio_model_with_a_scalar_rate_gets_a_reference(tmp_path: Path) -> None:
    report = _report(tmp_path, models.stateful_audio(), OptimizeOptions(max_batch_size=0))
    reference = report["reference"]
    assert reference["source"] == "search"
    assert "Pad" in reference["attempts"][0]["error"]
    last = reference["attempts"][-1]
    assert last["error"] is None and last["values"] == {"sr": models.AUDIO_RATE}
    assert last["shapes"] == {"input": [1, 2 * models.AUDIO_PAD], "state": [2, 1, 128], "sr": []}
    assert _tried(report, "int8_dynamic")["accuracy"]


def test_the_search_is_bounded_and_reports_every_attempt(tmp_path: Path) -> None:
    info = analyze(models.save(models.stride_detector(), tmp_path))

    def never(feed: Feed) -> None:
        raise RuntimeError("Concat: mismatched dimensions")

    with pytest.raises(NoRunnableInputs) as failed:
        build_reference(info, None, 8, batch_dim=True, probe=never)
    attempts = failed.value.attempts
    assert 1 < len(attempts) <= MAX_ATTEMPTS + 1
    assert all("mismatched" in a["error"] for a in attempts if "shapes" in a)
    with pytest.raises(NoRunnableInputs) as timed_out:
        build_reference(info, None, 8, batch_dim=True, probe=never, budget_s=0.0)
    assert "stopped" in timed_out.value.attempts[-1]["error"]


def _never_runs() -> onnx.ModelProto:
    """x FP32 [batch, n] reshaped to rows of 13: no searched size is a multiple of 13."""
    shape = numpy_helper.from_array(np.array([-1, 13], np.int64), "rows")
    return _model(
        [helper.make_node("Reshape", ["x", "rows"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 13])],
        [shape],
    )


def test_the_summary_says_why_nothing_was_applied(tmp_path: Path) -> None:
    skipped = _report(tmp_path / "never", _never_runs())
    assert skipped["selected"] == "original"
    assert skipped["summary"].startswith("nothing applied: no generated input ran on the model")
    assert skipped["reference"]["source"] == "none" and len(skipped["reference"]["attempts"]) > 1
    assert all(step["status"] == "skipped" for step in skipped["steps"])
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark())
    digits = models.save(models.trained_digits().model, tmp_path / "digits")
    equal = pipeline.run(digits, OptimizeOptions()).report
    summary = equal["summary"]
    # the same outcome for the same reason is said once, for every candidate it applies to
    assert summary.startswith("nothing applied, serving the original: graph_opt, int8_dynamic, int8_static rejected")
    assert "(passed the guard; not faster than original" in summary and "prune" not in summary
    assert "openvino_fp32, openvino_bf16, openvino_int8 skipped (OpenVINO unavailable" in summary
    served = _report(tmp_path / "detector", models.stride_detector())
    assert served["summary"].startswith("serving int8_static: fastest")


def test_a_thread_count_change_alone_is_not_called_nothing(tmp_path: Path) -> None:
    """What improved the one public model that improved: the original model, with fewer threads."""
    benchmark = FakeBenchmark({"compile:threads=1": 5.0})
    digits = models.save(models.trained_digits().model, tmp_path / "digits")
    result = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=benchmark).run(digits, OptimizeOptions())
    assert result.report["selected"] == "original" and result.session.intra_op_threads == 1
    summary = result.report["summary"]
    assert summary.startswith("serving the original with a tuned session (threads=1: fastest: 40.000 ms vs the default")
    assert "no model candidate applied: graph_opt, int8_dynamic, int8_static rejected" in summary


def test_a_quantized_graph_that_does_not_load_falls_back_to_the_next_setting(tmp_path: Path) -> None:
    """Paddle exports are opset 11/12: per-channel QDQ writes DequantizeLinear with an ``axis`` that only opset
    13 has. The quantizer returns without error; the pass must load-check and try per-tensor."""
    model = models.conv_net()
    model.opset_import[0].version = 11
    onnx.checker.check_model(model)
    source = models.save(model, tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    details = quant.apply(source, tmp_path / "qdq.onnx", quant.configure(ctx), ctx)
    assert details["quantizer_setting"] == "per_tensor"
    assert "INVALID_GRAPH" in details["quantizer_attempts"][0]["error"]
    ort.InferenceSession(str(tmp_path / "qdq.onnx"), providers=["CPUExecutionProvider"])


def _anonymous_state_model() -> onnx.ModelProto:
    """input [?, ?] and state [2, ?, 4] with no dim names (as some exporters write them); the graph reshapes
    the state to [2, 4], so only a state whose unnamed dim is 1 (the batch) runs."""
    nodes = [
        helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
        helper.make_node("Reshape", ["state", "flat"], ["state2"]),
        helper.make_node("Add", ["state2", "total"], ["out"]),
    ]
    shape = numpy_helper.from_array(np.array([2, 4], np.int64), "flat")
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, None]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])]
    return _model(nodes, inputs, outputs, [shape])


def test_unnamed_state_dims_are_tried_as_the_batch(tmp_path: Path) -> None:
    report = _report(tmp_path, _anonymous_state_model(), OptimizeOptions(max_batch_size=0))
    reference = report["reference"]
    assert reference["source"] == "search"
    assert reference["attempts"][-1]["error"] is None
    assert reference["attempts"][-1]["shapes"]["state"] == [2, 1, 4]
    assert reference["attempts"][-1]["shapes"]["input"][1] > 1  # the data input keeps the searched length


# ---- weights inside If/Loop subgraphs (spox exports: a voice-activity detector's branches per sample rate) -------
def test_weights_inside_if_branches_are_seen() -> None:
    model = models.branching()
    normalized, folded = normalize(model)
    assert folded == 4  # two Constant weights in each branch, now the branches' initializers
    branches = [attribute.g for attribute in normalized.graph.node[-1].attribute]
    assert all(len(branch.initializer) == 2 and len(branch.node) == 5 for branch in branches)
    info = analyze_model(model)
    assert info.weight_params == {} and not info.has_float_weights
    assert info.subgraph_weight_params == {"Conv": 2 * 8 * 3 * 3 * 3, "MatMul": 2 * 8 * 4}
    assert info.subgraph_hosts == ("If",)
    assert info.subgraph_note == "432 Conv and 64 MatMul weights inside If subgraphs"


def _branch_inputs() -> dict[str, Feed]:
    rng = np.random.default_rng(3)
    image = rng.random((16, 3, 8, 8)).astype(np.float32)
    return {"then": {"image": image}, "else": {"image": -image}}  # mean > 0 takes then_branch


def test_int8_dynamic_quantizes_the_matmuls_inside_if_branches(tmp_path: Path) -> None:
    source = models.save(models.branching(), tmp_path)
    ctx = context(source)
    quant = Int8DynamicPass()
    config = quant.configure(ctx)
    assert config.subgraphs and quant.skip_reason(ctx, config) is None  # conv-heavy, but static cannot reach
    details = quant.apply(source, tmp_path / "q.onnx", config, ctx)
    inside = details["subgraphs"]
    assert inside["int8_ops"] == 2 and inside["hosts"] == ["If"]
    assert "now run in INT8" in inside["note"] and "Conv weights stay float" in inside["note"]
    branches = {a.name: a.g for a in onnx.load(str(tmp_path / "q.onnx")).graph.node[-1].attribute}
    for branch in branches.values():
        assert "MatMulInteger" in {node.op_type for node in branch.node}
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    for feed in _branch_inputs().values():
        want, got = original.run(None, feed)[0], quantized.run(None, feed)[0]
        assert np.abs(want - got).max() < 0.05 * np.abs(want).max()


def test_the_report_says_why_int8_did_or_did_not_reach_the_branches(tmp_path: Path) -> None:
    report = _report(tmp_path, models.branching())
    steps = {step["name"]: step for step in report["steps"]}
    static = steps["int8_static"]
    assert static["status"] == "skipped"
    assert "432 Conv and 64 MatMul weights inside If subgraphs" in static["reason"]
    assert "does not enter subgraphs" in static["reason"]
    dynamic = _tried(report, "int8_dynamic")
    assert dynamic["details"]["subgraphs"]["int8_ops"] == 2 and dynamic["accuracy"]
    if report["selected"] == "original":
        assert "int8_static skipped (the model's only weights are" in report["summary"]


def test_a_yolo_shaped_detector_gets_a_size_that_runs_and_int8_is_tried(tmp_path: Path) -> None:
    report = _report(tmp_path, models.yolo_detector())
    reference = report["reference"]
    assert reference["source"] == "search" and reference["count"] == 32
    failed = [a for a in reference["attempts"] if a["error"]]
    assert failed and all("Concat" in a["error"] for a in failed)  # the random guess, then sizes off 32
    found = reference["attempts"][-1]
    assert found["error"] is None
    _batch, colours, height, width = found["shapes"]["images"]
    assert colours == 3 and height % 32 == 0 and width % 32 == 0
    static = _tried(report, "int8_static")
    assert static["accuracy"] and static["details"]["quantizer_setting"]
    dynamic = next(s for s in report["steps"] if s["name"] == "int8_dynamic")
    assert dynamic["reason"] == "no MatMul/Gemm with constant weights"
    assert report["summary"].startswith("serving int8_static")  # the fake timing makes it fastest
