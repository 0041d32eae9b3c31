"""``optiserve optimize`` offline: writes OUT/model.onnx + OUT/report.json and prints the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizers import cli
from tests.unit.optimizers import models


def test_optimize_writes_model_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = models.trained_digits()
    model = models.save(digits.model, tmp_path / "in")
    np.savez(tmp_path / "s.npz", x=digits.x_test[:64])
    out = tmp_path / "out"
    argv = [str(model), "-o", str(out), "--cache-dir", str(tmp_path / "cache"), "--time-budget", "0.05"]
    argv += ["--samples", str(tmp_path / "s.npz"), "--prune-sparsity", "0.5", "--accuracy", "cosine=0.98", "-q"]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert json.loads((out / "session_options.json").read_text()) == report["session_options"]
    assert report["reference"]["source"] == "samples" and report["reference"]["count"] == 64
    prune = next(s for s in report["steps"] if s["name"] == "prune")
    assert prune["status"] != "skipped" and prune["thresholds"]["cosine"] == 0.98
    printed = capsys.readouterr().out
    assert "selected:" in printed and "int8_dynamic" in printed


def test_bad_options_fail_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "in")
    base = [str(model), "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*base, "--prune-sparsity", "0.3", "--prune-pattern", "2:4"]) == 1
    assert "prune: pattern 2:4" in capsys.readouterr().err
    assert cli.main([*base, "--accuracy", "cosine"]) == 1
    assert "METRIC=NUMBER" in capsys.readouterr().err
    assert cli.main([*base, "--target", "cuda"]) == 1
    assert "CUDAExecutionProvider" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]) == 1
    with pytest.raises(SystemExit):
        cli.main([str(model), "--precision", "int4", "-o", "x"])


def test_precision_none_copies_the_model(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main([str(model), "-o", str(out), "--precision", "none", "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    assert (out / "model.onnx").read_bytes() == model.read_bytes()
