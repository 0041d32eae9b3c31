"""convert_version end to end (worker process, guard, cache) for each framework: the converted ONNX model
gives the framework's own outputs, the report step carries the figures, a second call is a cache hit, a
drifting conversion is refused with its figures, and a missing extra is named."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from server.convert import ConversionRejected, convert_version, detect, is_convertible
from server.errors import LoadFailed
from tests.models import frameworks


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


def _version(tmp_path: Path) -> Path:
    folder = tmp_path / "repo" / "m" / "1"
    folder.mkdir(parents=True)
    return folder


def _convert(folder: Path, cache: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("max_batch_size_hint", None)
    kwargs.setdefault("samples", None)
    return convert_version(folder, cache_dir=cache, **kwargs)


def test_torch_export_archive(tmp_path: Path) -> None:
    folder = _version(tmp_path)
    model = frameworks.save_pt2(folder / "model.pt2")
    assert is_convertible(folder) and detect(folder).framework == "torch"  # type: ignore[union-attr]
    result = _convert(folder, tmp_path / "cache", max_batch_size_hint=8)
    x = frameworks.images(5)
    np.testing.assert_allclose(_run(result.onnx_path, {"x": x})[0], frameworks.torch_outputs(model, x), atol=1e-5)
    step = result.report_step
    assert step["name"] == "convert:torch" and step["status"] == "applied"
    assert step["accuracy"]["rel_l2"] < 1e-5 and step["thresholds"] == {"rel_l2": 1e-4}
    assert step["size_bytes"]["before"] > 0 and step["size_bytes"]["after"] > 0
    again = _convert(folder, tmp_path / "cache", max_batch_size_hint=8)
    assert again.onnx_path == result.onnx_path and again.report_step["details"]["cache_hit"] is True


def test_static_batch_archive_is_made_dynamic_or_refused_clearly(tmp_path: Path) -> None:
    folder = _version(tmp_path)
    frameworks.save_pt2(folder / "model.pt2", dynamic=False)
    try:
        result = _convert(folder, tmp_path / "cache", max_batch_size_hint=8)
    except LoadFailed as exc:
        assert "dim 0 is static" in exc.message and "max_batch_size: 0" in exc.message
        return
    outputs = _run(result.onnx_path, {"x": frameworks.images(3)})
    assert outputs[0].shape == (3, 5)


@pytest.mark.parametrize(("objective", "name"), [("multi:softprob", "model.json"), ("reg:squarederror", "model.ubj")])
def test_xgboost(tmp_path: Path, objective: str, name: str) -> None:
    xgb = pytest.importorskip("xgboost")
    folder = _version(tmp_path)
    booster = frameworks.xgboost_booster(objective)
    booster.save_model(str(folder / name))
    x = frameworks.rows(40)
    samples = {"input": x}
    result = _convert(folder, tmp_path / "cache", samples=samples)
    outputs = _run(result.onnx_path, {"input": x})
    expected = booster.predict(xgb.DMatrix(x))
    np.testing.assert_allclose(outputs[-1].reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    assert "40 user-sample inputs" in result.report_step["reason"]


def test_lightgbm(tmp_path: Path) -> None:
    folder = _version(tmp_path)
    booster = frameworks.lightgbm_booster()
    booster.save_model(str(folder / "model.txt"))
    result = _convert(folder, tmp_path / "cache")
    x = frameworks.rows(50)
    label, probabilities = _run(result.onnx_path, {"input": x})
    np.testing.assert_allclose(probabilities[:, 1], booster.predict(x), rtol=1e-5, atol=1e-6)
    assert label.shape == (50,)
    assert "random inputs" in result.report_step["reason"]


def test_tensorflow_saved_model(tmp_path: Path) -> None:
    folder = _version(tmp_path)
    model = frameworks.keras_saved_model(folder / "saved_model")
    result = _convert(folder, tmp_path / "cache", max_batch_size_hint=4)
    x = frameworks.rows(7)
    outputs = _run(result.onnx_path, {"x": x})
    np.testing.assert_allclose(outputs[0], model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert result.report_step["name"] == "convert:tensorflow"


def test_a_drifting_conversion_is_refused_with_figures(tmp_path: Path) -> None:
    folder = _version(tmp_path)
    frameworks.lightgbm_booster().save_model(str(folder / "model.txt"))
    with pytest.raises(ConversionRejected) as caught:
        _convert(folder, tmp_path / "cache", thresholds={"rel_l2": 0.0, "cosine": 1.0000001})
    assert "rel_l2" in caught.value.message and "cosine" in caught.value.message
    step = caught.value.report_step
    assert step["status"] == "rejected" and step["accuracy"]["rel_l2"] > 0
    assert not list((tmp_path / "cache" / "artifacts").glob("*.onnx"))


def test_a_missing_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _version(tmp_path)
    (folder / "model.txt").write_bytes(b"tree\nversion=v4\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightgbm" else real(name, *a))
    with pytest.raises(LoadFailed, match=r"install optiserve\[sklearn\]"):
        _convert(folder, tmp_path / "cache")


def test_nothing_to_convert_and_broken_files(tmp_path: Path) -> None:
    folder = _version(tmp_path)
    assert not is_convertible(folder)
    with pytest.raises(LoadFailed, match=r"no model\.onnx"):
        _convert(folder, tmp_path / "cache")
    (folder / "model.txt").write_bytes(b"tree\nversion=v4\nthis is not a model")
    with pytest.raises(LoadFailed, match="LightGBM"):
        _convert(folder, tmp_path / "cache")
