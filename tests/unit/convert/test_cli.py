"""``optiserve convert`` (server.convert.cli), offline: a scikit-learn pipeline pickle becomes an ONNX model
that gives the pipeline's own outputs, with the accuracy comparison printed; a drifting conversion writes
nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server.convert import cli
from tests.models import frameworks

joblib = pytest.importorskip("joblib")
pytest.importorskip("skl2onnx", reason="needs the sklearn extra (make test installs it)")


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    pipeline = frameworks.sklearn_pipeline()
    path = tmp_path_factory.mktemp("skl") / "pipeline.joblib"
    joblib.dump(pipeline, path)
    return path, pipeline


def test_sklearn_pipeline_converts_and_matches(
    pipeline_file: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, pipeline = pipeline_file
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=frameworks.rows(40, seed=3))
    output = tmp_path / "out" / "model.onnx"
    assert cli.main([str(path), "--sample", str(samples), "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "convert:sklearn: applied" in printed and "rel_l2=" in printed and "40 user-sample inputs" in printed
    x = frameworks.rows(25, seed=9)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"input": x})
    np.testing.assert_array_equal(label, pipeline.predict(x))  # type: ignore[attr-defined]
    np.testing.assert_allclose(probabilities, pipeline.predict_proba(x), rtol=1e-5, atol=1e-6)  # type: ignore[attr-defined]


def test_a_refused_conversion_writes_nothing(
    pipeline_file: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "model.onnx"
    code = cli.main([str(pipeline_file[0]), "--accuracy", "cosine=1.5", "-o", str(output)])
    assert code == 1 and not output.exists()
    assert "refused" in capsys.readouterr().err


def test_unknown_names_need_a_framework(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    assert cli.main([str(path), "-o", str(tmp_path / "o.onnx")]) == 1
    assert "--framework" in capsys.readouterr().err
