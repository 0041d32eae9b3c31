"""The server's onnxruntime backend on OpenVINO: it opens the session the optimizer timed (through the plugin, the
explicit precision kept, no providers argument) with the instance's threads binding OpenVINO, reports the engine
and precision it really runs, refuses an implicit precision, and serves on onnxruntime's CPU kernels with a
warning where the plugin offers no device. A stand-in plays OpenVINO; the last test uses the real plugin, which
runs on Intel CPUs and is absent elsewhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optimizers import engines, openvino
from optimizers.providers import CPU, OPENVINO
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig
from server.errors import LoadFailed
from tests.unit.optimizers import models
from tests.unit.optimizers.openvino_fakes import StandInPlugin, to_bf16


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    data = models.trained_digits()
    return models.save(data.model, tmp_path_factory.mktemp("digits")), data.x_test[:16]


def _config(options: dict[str, str], threads: int = 2) -> SessionConfig:
    return SessionConfig(intra_op_threads=threads, providers=(OPENVINO, CPU), provider_options={OPENVINO: options})


def _cpu(model: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(ort.InferenceSession(str(model), providers=[CPU]).run(None, {"x": x})[0])


def test_serves_the_timed_openvino_session(monkeypatch: pytest.MonkeyPatch, digits: tuple[Path, np.ndarray]) -> None:
    stand_in = StandInPlugin()
    monkeypatch.setattr(openvino, "PLUGIN", stand_in)
    model, x = digits
    cache = model.parent / "cache"
    spec = engines.openvino_spec("bf16", cache_root=cache)  # what the optimizer hands over, applied as the loader does
    backend = OnnxRuntimeBackend("digits", model, _config(spec.provider_options[OPENVINO], threads=2))
    backend.load()
    (call,) = stand_in.calls
    assert json.loads(call["passed"]["load_config"]) == {
        "CPU": {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "bf16"}
    }
    assert call["passed"][openvino.CACHE_OPTION] == str(openvino.cache_dir(cache))  # compiled once, read here
    assert backend.providers[0] == OPENVINO and backend.device == "cpu"
    assert backend.engine == {"engine": "openvino", "precision_hint": "bf16", "nodes": {OPENVINO: 5}}
    served = backend.infer({"x": x})["logits"]
    np.testing.assert_array_equal(served, to_bf16(_cpu(model, x)))
    backend.unload()


def test_an_implicit_precision_does_not_load(monkeypatch: pytest.MonkeyPatch, digits: tuple[Path, np.ndarray]) -> None:
    monkeypatch.setattr(openvino, "PLUGIN", StandInPlugin())
    backend = OnnxRuntimeBackend("digits", digits[0], _config({"device_type": "CPU"}))
    with pytest.raises(LoadFailed, match="must set its precision"):
        backend.load()


def test_without_a_device_it_serves_on_the_cpu_and_says_so(
    monkeypatch: pytest.MonkeyPatch, digits: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(openvino, "PLUGIN", StandInPlugin(unavailable=True))
    model, x = digits
    backend = OnnxRuntimeBackend("digits", model, _config(openvino.provider_options("f32")))
    with caplog.at_level(logging.WARNING, logger="optiserve.backends"):
        backend.load()
    assert backend.providers == [CPU] and backend.engine["engine"] == "onnxruntime"
    assert "OpenVINO unavailable" in backend.engine["fallback"] and "OpenVINO unavailable" in caplog.text
    np.testing.assert_allclose(backend.infer({"x": x})["logits"], _cpu(model, x), rtol=1e-6)
    backend.unload()


def test_the_real_plugin_runs_openvino_or_says_why_not(digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    backend = OnnxRuntimeBackend("digits", model, _config(openvino.provider_options("f32")))
    backend.load()
    found = openvino.availability()
    if found.offers("CPU"):
        assert backend.engine["engine"] == "openvino" and backend.engine["nodes"].get(OPENVINO, 0) > 0
        assert backend.engine_fallback is None
    else:
        assert found.reason in str(backend.engine_fallback) and backend.providers == [CPU]
    np.testing.assert_allclose(backend.infer({"x": x})["logits"], _cpu(model, x), rtol=1e-4, atol=1e-5)
    backend.unload()
