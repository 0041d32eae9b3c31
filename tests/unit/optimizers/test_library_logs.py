"""onnxruntime's chatter while the optimizer quantizes and searches for reference inputs (its quantizer's notes,
its C++ warnings about unused initializers, a failing guess's kernel error) stays out of a log at INFO and shows
at DEBUG; the outcome is in the report either way."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimizers import library_logs
from optimizers.modelinfo import analyze
from optimizers.passes.int8_static import Int8StaticPass
from optimizers.reference import SessionProbe, build_reference
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context

NATIVE = ("[W:onnxruntime", "[E:onnxruntime")


def _noisy_model(folder: Path) -> Path:
    """A conv net with an initializer no node reads: onnxruntime's C++ logger warns that it removes it whenever a
    session loads the graph (the quantizer's own sessions included)."""
    model = models.conv_net()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused"))
    return models.save(model, folder)


def _quantize(folder: Path) -> None:
    source = _noisy_model(folder)
    ctx = context(source)
    quant = Int8StaticPass()
    quant.apply(source, folder / "qdq.onnx", quant.configure(ctx), ctx)
    onnx.checker.check_model(str(folder / "qdq.onnx"))


def _library_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if library_logs._FILTER.is_library(r)]


def test_quantizer_chatter_stays_out_of_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    _quantize(tmp_path)
    assert _library_records(caplog) == []
    err = capfd.readouterr().err
    assert not any(mark in err for mark in NATIVE), err


def test_quantizer_chatter_shows_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    _quantize(tmp_path)
    records = _library_records(caplog)
    assert records and {r.levelno for r in records} == {logging.DEBUG}
    assert any("symbolic shape inference" in r.getMessage() for r in records)
    assert "Removing initializer 'unused'" in capfd.readouterr().err  # onnxruntime's C++ warning, left on


def test_the_warning_level_comes_back_after_quantizing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("optiserve.optimizers").setLevel(logging.INFO)
    try:
        _quantize(tmp_path)
    finally:
        logging.getLogger("optiserve.optimizers").setLevel(logging.NOTSET)
    assert library_logs._quiet_depth == 0
    capfd.readouterr()
    import onnxruntime as ort

    ort.InferenceSession(str(_noisy_model(tmp_path / "again")), providers=["CPUExecutionProvider"])
    assert "Removing initializer 'unused'" in capfd.readouterr().err  # onnxruntime warns again


def test_failing_reference_guesses_print_no_kernel_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    path = models.save(models.stride_detector(), tmp_path)
    probe = SessionProbe(path)
    try:
        reference = build_reference(analyze(path), None, 8, batch_dim=True, probe=probe)
    finally:
        probe.close()
    assert reference.source == "search" and "Concat" in str(reference.attempts[0]["error"])
    err = capfd.readouterr().err
    assert not any(mark in err for mark in NATIVE), err
    caplog.set_level(logging.DEBUG, logger="optiserve.optimizers")
    probe = SessionProbe(path)
    with pytest.raises(Exception, match="Concat"):
        probe({"image": np.zeros((1, 3, 40, 40), np.float32)})
    assert any("reference guess" in r.getMessage() and "Concat" in r.getMessage() for r in caplog.records)
