"""The report's schema: every field the server and the CLI rely on, JSON-able, the same on a cache hit."""

from __future__ import annotations

import json
from pathlib import Path

from optimizers import OptimizeOptions, Pipeline
from optimizers.report import Report, format_table
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, fake_device

TOP = {
    *("model", "version", "device", "selected", "engine", "cache_hit"),
    *("reference", "steps", "session_options", "timing"),
}
STEP = {"name", "status", "reason", "duration_s", "size_bytes", "latency_ms", "accuracy", "thresholds"}


def test_schema(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark({"int8_dynamic": 1.0}))
    result = pipeline.run(model, OptimizeOptions(prune={"sparsity": 0.5}), name="digits", version="3")
    report = result.report
    assert set(report) >= TOP
    assert (report["model"], report["version"], report["cache_hit"], report["cache"]) == ("digits", "3", False, "miss")
    assert report["device"]["fingerprint"] == fake_device().fingerprint
    assert report["reference"]["source"] == "random"
    assert report["reference"]["count"] == 32 and "weak check" in report["reference"]["note"]
    names = [step["name"] for step in report["steps"]]
    engines = ["openvino_fp32", "openvino_bf16", "openvino_int8"]
    assert names == ["graph_opt", "int8_dynamic", "int8_static", "fp16", "prune", *engines, "compile"]
    assert report["engine"] == {  # int8_dynamic won, on onnxruntime's CPU kernels: every node recorded there
        "engine": "onnxruntime",
        "precision": "int8",
        "providers": ["CPUExecutionProvider"],
        "nodes": {"CPUExecutionProvider": report["engine"]["nodes"]["CPUExecutionProvider"]},
    }
    assert report["engine"]["nodes"]["CPUExecutionProvider"] > 0
    for step in report["steps"]:
        assert set(step) >= STEP
        assert step["status"] in ("applied", "rejected", "skipped")
        assert step["reason"], step
        assert set(step["size_bytes"]) == set(step["latency_ms"]) == {"before", "after"}
        if step["status"] != "skipped" and step["name"] != "compile":
            assert step["accuracy"] and step["thresholds"] and step["size_bytes"]["after"] > 0
    Report.model_validate(report)
    json.loads(json.dumps(report))
    hit = pipeline.run(model, OptimizeOptions(prune={"sparsity": 0.5}), name="digits", version="3")
    assert {k: v for k, v in hit.report.items() if k not in ("cache_hit", "cache", "duration_s")} == {
        k: v for k, v in report.items() if k not in ("cache_hit", "cache", "duration_s")
    }
    table = format_table(report)
    assert all(name in table for name in names) and "random inputs: a weak check" in table
