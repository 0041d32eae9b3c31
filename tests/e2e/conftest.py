"""One real server for the protocol tests, serving every fixture model plus config variants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ServerProcess
from tests.models import fixtures

CONFIGURED_PBTXT = """
name: "configured"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 8 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

YAML_CONFIG = """
max_batch_size: 0
input:
  - name: x
    dims: [-1, 8]
"""


def sample_inputs(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs that fit each fixture model."""
    if name in ("mlp", "configured", "yaml_configured"):
        return {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    if name == "int64":
        return {"ids": rng.integers(-1000, 1000, (2, 5)).astype(np.int64)}
    if name == "multi_io":
        return {
            "a": rng.standard_normal((2, 3)).astype(np.float32),
            "b": rng.standard_normal((2, 3)).astype(np.float32),
        }
    if name == "dynamic_seq":
        return {"tokens": rng.standard_normal((2, 7)).astype(np.float32)}
    if name == "no_batch":
        return {"x": rng.standard_normal((2, 3)).astype(np.float32)}
    if name == "strings":
        return {"text": np.array([[b"hello", "héllo".encode()], [b"", b"x y z"]], dtype=object)}
    if name == "fp16":
        return {"h": rng.standard_normal((3, 4)).astype(np.float16)}
    raise KeyError(name)


def reference_outputs(model_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What onnxruntime gives in-process for the same model file."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feed = {}
    for key, value in inputs.items():
        if value.dtype == object:
            value = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(value)
        feed[key] = value
    names = [o.name for o in session.get_outputs()]
    results = {}
    for name, out in zip(names, session.run(None, feed), strict=True):
        out = np.asarray(out)
        if out.dtype == object:
            out = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(out)
        results[name] = out
    return results


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name, build in fixtures.ALL.items():
        fixtures.write_model(repo, name, build())
    fixtures.write_model(repo, "configured", fixtures.float_mlp(), config=CONFIGURED_PBTXT)
    fixtures.write_model(repo, "yaml_configured", fixtures.float_mlp(), config=YAML_CONFIG, config_name="config.yaml")
    # Two versions: the default policy (latest 1) serves only version 2.
    fixtures.write_model(repo, "versioned", fixtures.float_mlp(seed=1), version=1)
    fixtures.write_model(repo, "versioned", fixtures.float_mlp(seed=2), version=2)
    return repo


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(model_repo).start()
    yield proc
    proc.stop()
