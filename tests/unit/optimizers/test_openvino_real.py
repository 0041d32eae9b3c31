"""The real OpenVINO plugin, where it offers this CPU (Intel only; skipped elsewhere with the reason): the explicit
precision is the one that runs (f32 matches onnxruntime, bf16 measurably does not), nodes are placed on OpenVINO,
and the trap this code avoids (a ``providers`` argument beside the plugin) really drops it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optimizers import engines, openvino, probe_device
from optimizers.accuracy import relative_l2
from optimizers.providers import CPU, OPENVINO
from optimizers.runtime import SessionSpec, open_session, run_checked
from tests.unit.optimizers import models

FOUND = openvino.availability()
pytestmark = pytest.mark.skipif(not FOUND.offers("CPU"), reason=f"no OpenVINO CPU here: {FOUND.reason}")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    data = models.trained_digits()
    path = models.save(data.model, tmp_path_factory.mktemp("digits"))
    return path, [{"x": data.x_test[i : i + 32]} for i in range(0, 128, 32)]


def _error(path: Path, spec: SessionSpec, batches: list[dict[str, np.ndarray]]) -> tuple[float, dict[str, int]]:
    reference = run_checked(path, SessionSpec(), batches).outputs
    run = run_checked(path, spec, batches)
    ref = np.concatenate([b["logits"].ravel() for b in reference])
    got = np.concatenate([b["logits"].ravel() for b in run.outputs])
    return relative_l2(ref.astype(np.float64), got.astype(np.float64)), run.nodes


def test_f32_runs_f32_on_openvino(digits: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    error, nodes = _error(digits[0], engines.openvino_spec("f32"), digits[1])
    assert nodes.get(OPENVINO, 0) > 0, nodes
    assert error < 1e-5, f"f32 asked, rel_l2 {error:.2e}: OpenVINO did not compute in f32"


def test_bf16_runs_bf16_on_openvino(digits: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    if not probe_device().has_bf16:
        pytest.skip("this CPU has neither avx512_bf16 nor amx_bf16")
    error, nodes = _error(digits[0], engines.openvino_spec("bf16"), digits[1])
    assert nodes.get(OPENVINO, 0) > 0, nodes
    assert 1e-5 < error < 1e-2, f"bf16 asked, rel_l2 {error:.2e}"


def test_a_providers_argument_beside_the_plugin_drops_it(digits: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path = digits[0]
    options = ort.SessionOptions()
    options.add_session_config_entry(openvino.ASSIGNMENT_ENTRY, "1")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == OPENVINO and d.ep_metadata.get("ov_device") == "CPU"]
    options.add_provider_for_devices(devices, openvino.plugin_options(openvino.provider_options("f32")))
    with pytest.warns(UserWarning, match="will only use the providers"):
        session = ort.InferenceSession(str(path), options, providers=[CPU])
    assert OPENVINO not in openvino.placement(session) and OPENVINO not in session.get_providers()
    ours = open_session(path, engines.openvino_spec("f32"))  # the one way this code opens it
    assert openvino.placement(ours).get(OPENVINO, 0) > 0


def test_a_second_session_compiles_from_the_model_cache(
    digits: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path
) -> None:
    spec = engines.openvino_spec("f32", cache_root=tmp_path)
    first = run_checked(digits[0], spec, digits[1][:1])
    blobs = sorted(p.name for p in openvino.cache_dir(tmp_path).rglob("*") if p.is_file())
    assert blobs, "OpenVINO wrote nothing into its model cache"
    again = run_checked(digits[0], spec, digits[1][:1])  # a restart: same model, same options
    assert sorted(p.name for p in openvino.cache_dir(tmp_path).rglob("*") if p.is_file()) == blobs
    np.testing.assert_array_equal(first.outputs[0]["logits"], again.outputs[0]["logits"])
