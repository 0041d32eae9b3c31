"""The converter hand-off does not depend on working folders: the worker runs in its job folder, so a
relative cache, repository or samples path (``.optiserve-cache``, the default) must reach it absolute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.convert import convert_version, worker
from server.convert.job import JOB_FILE, RESULT_FILE, Job
from tests.models import frameworks


def test_job_absolute_makes_every_path_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = Job("xgboost", "repo/m/1/model.json", ".cache/tmp/x", "samples.npz", 4)
    assert sorted(job.relative_paths()) == sorted(["repo/m/1/model.json", ".cache/tmp/x", "samples.npz"])
    absolute = job.absolute()
    assert absolute.source == str(tmp_path / "repo/m/1/model.json")
    assert absolute.work_dir == str(tmp_path / ".cache/tmp/x")
    assert absolute.samples == str(tmp_path / "samples.npz")
    assert absolute.relative_paths() == [] and absolute.max_batch_size_hint == 4
    assert Job("xgboost", "/a", "/b").absolute().samples is None


def test_worker_refuses_a_relative_job_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["relative/job"]) == 2
    assert "ABSOLUTE_JOB_DIR" in capsys.readouterr().err


def test_worker_refuses_relative_paths_in_the_job(tmp_path: Path) -> None:
    (tmp_path / JOB_FILE).write_text(Job("xgboost", "model.json", str(tmp_path)).to_json())
    assert worker.main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert result["ok"] is False and "'model.json'" in result["error"]


def test_relative_version_and_cache_folders_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the loader does with ``--model-repository models`` and the default cache, run from elsewhere."""
    lgbm = frameworks.lightgbm_booster()
    pytest.importorskip("onnxmltools")
    monkeypatch.chdir(tmp_path)
    version = Path("models/lgbm/1")
    version.mkdir(parents=True)
    lgbm.save_model(str(version / "model.txt"))
    cache = Path(".optiserve-cache/converted")
    result = convert_version(version, max_batch_size_hint=8, cache_dir=cache, samples=None)
    assert result.report_step["status"] == "applied", result.report_step
    assert result.onnx_path.is_absolute()
    assert result.onnx_path.is_relative_to(tmp_path / ".optiserve-cache" / "converted" / "artifacts")
    import onnxruntime as ort

    rows = frameworks.rows(5, seed=3)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"input": rows})
    np.testing.assert_allclose(np.asarray(probabilities)[:, 1], lgbm.predict(rows), rtol=1e-5, atol=1e-6)
