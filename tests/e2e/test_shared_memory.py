"""Triton's system shared-memory extension on the real server, driven by NVIDIA's clients and shm utilities:
inputs read from and outputs written to /dev/shm regions over HTTP (JSON and binary) and gRPC match in-process
onnxruntime; bad keys, windows and region names are refused as 400/INVALID_ARGUMENT; unregistering works and
leaves the client's segment; a server without --allow-client-shm refuses to register."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.e2e.conftest import reference_outputs
from tests.models import fixtures

PROTOCOLS = ["http-json", "http-binary", "grpc"]
PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shm")
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())
    return repo


@pytest.fixture(scope="module")
def shm_server(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo, "--allow-client-shm", "--default-precision", "none").start()
    yield proc
    proc.stop()


@pytest.fixture
def segments() -> Iterator[list[Any]]:
    """Segments made by this test, destroyed (by the client, as it should be) afterwards."""
    made: list[Any] = []
    yield made
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _segment(made: list[Any], tag: str, size: int) -> tuple[Any, str]:
    key = f"/optiserve_e2e_{os.getpid()}_{tag}"
    made.append(shm.create_shared_memory_region(tag, key, size))
    return made[-1], key


def _client(server: ServerProcess, protocol: str) -> Any:
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(server.grpc_address)
    return httpclient.InferenceServerClient(server.http_address)


def _module(protocol: str) -> Any:
    return grpcclient if protocol == "grpc" else httpclient


def _infer(client: Any, protocol: str, inputs: list[Any], outputs: list[Any]) -> Any:
    return client.infer("mlp", inputs, outputs=outputs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_inputs_and_outputs_in_shared_memory_match_onnxruntime(
    shm_server: ServerProcess, repo: Path, segments: list[Any], protocol: str
) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    expected = reference_outputs(repo / "mlp" / "1" / "model.onnx", {"x": x})["y"]
    in_handle, in_key = _segment(segments, f"in_{protocol}", 256)
    out_handle, out_key = _segment(segments, f"out_{protocol}", 256)
    shm.set_shared_memory_region(in_handle, [x], offset=16)
    client, module = _client(shm_server, protocol), _module(protocol)
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("in", in_key, x.nbytes, offset=16)
    client.register_system_shared_memory("out", out_key, 256)
    try:
        tensor = module.InferInput("x", list(x.shape), "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        output = module.InferRequestedOutput("y", binary_data=True) if protocol == "http-binary" else None
        output = output or module.InferRequestedOutput("y")
        output.set_shared_memory("out", expected.nbytes, offset=32)
        result = _infer(client, protocol, [tensor], [output])
        got = shm.get_contents_as_numpy(out_handle, np.float32, list(expected.shape), offset=32)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        described = result.get_output("y")
        if protocol == "grpc":
            assert described.parameters["shared_memory_region"].string_param == "out"
        else:  # as Triton: the output is listed without data or parameters
            assert described == {"name": "y", "datatype": "FP32", "shape": list(expected.shape)}
        status = client.get_system_shared_memory_status()
        names = sorted(r["name"] for r in status) if protocol != "grpc" else sorted(status.regions)
        assert names == ["in", "out"]
        # A mixed request: the input in shared memory, the output in the response body.
        plain = _infer(client, protocol, [tensor], [module.InferRequestedOutput("y")])
        np.testing.assert_allclose(plain.as_numpy("y"), expected, rtol=1e-5, atol=1e-5)
    finally:
        client.unregister_system_shared_memory("in")
        client.unregister_system_shared_memory("out")
    status = client.get_system_shared_memory_status()
    assert (len(status) if protocol != "grpc" else len(status.regions)) == 0
    assert os.path.exists("/dev/shm" + in_key)  # unmapped, never unlinked: the segment is the client's


def _refused(exc: InferenceServerException, protocol: str, field: str) -> None:
    status = str(exc.status())
    assert ("INVALID_ARGUMENT" in status) if protocol == "grpc" else status == "400", status
    assert field in exc.message(), exc.message()


@pytest.mark.parametrize("protocol", ["http-json", "grpc"])
def test_bad_registrations_and_requests_are_refused(
    shm_server: ServerProcess, segments: list[Any], protocol: str
) -> None:
    _, key = _segment(segments, f"bad_{protocol}", 64)
    client, module = _client(shm_server, protocol), _module(protocol)
    client.unregister_system_shared_memory()
    for bad_key, size, offset, field in [
        (key, 65, 0, "byte_size"),
        (key, 8, 60, "byte_size"),
        ("/../etc/passwd", 8, 0, "key"),
        ("/optiserve_no_such_segment", 8, 0, "key"),
    ]:
        with pytest.raises(InferenceServerException) as raised:
            client.register_system_shared_memory("r", bad_key, size, offset=offset)
        _refused(raised.value, protocol, field)
    client.register_system_shared_memory("r", key, 64)
    try:
        with pytest.raises(InferenceServerException) as raised:
            client.register_system_shared_memory("r", key, 64)
        _refused(raised.value, protocol, "already registered")
        for region, size, offset, field in [
            ("r", 16, 0, "input 'x'"),  # 16 bytes for a 1x8 FP32 tensor (32 bytes)
            ("r", 32, 40, "shared_memory_offset"),  # runs past the 64-byte region
            ("nope", 32, 0, "not registered"),
        ]:
            tensor = module.InferInput("x", [1, 8], "FP32")
            tensor.set_shared_memory(region, size, offset=offset)
            with pytest.raises(InferenceServerException) as raised:
                client.infer("mlp", [tensor])
            _refused(raised.value, protocol, field)
        with pytest.raises(InferenceServerException) as raised:
            client.get_system_shared_memory_status("nope")
        _refused(raised.value, protocol, "not registered")
    finally:
        client.unregister_system_shared_memory()


@pytest.mark.parametrize("protocol", ["http-json", "grpc"])
def test_server_without_the_flag_refuses_to_register(server: ServerProcess, segments: list[Any], protocol: str) -> None:
    _, key = _segment(segments, f"off_{protocol}", 64)
    client = _client(server, protocol)
    with pytest.raises(InferenceServerException) as raised:
        client.register_system_shared_memory("r", key, 64)
    _refused(raised.value, protocol, "--allow-client-shm")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_with_system_shared_memory(shm_server: ServerProcess, protocol: str) -> None:
    binary = str(PERF_ANALYZER) if PERF_ANALYZER.exists() else shutil.which("perf_analyzer")
    if binary is None:
        pytest.skip("perf_analyzer is not installed (make test installs it with bench/install-perf-analyzer.sh)")
    url = shm_server.http_address if protocol == "http" else shm_server.grpc_address
    cmd = [binary, "-m", "mlp", "-u", url, "-i", protocol, "--shared-memory", "system", "--concurrency-range", "2"]
    cmd += ["--measurement-interval", "1000", "--max-trials", "3", "--stability-percentage", "999"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "throughput" in result.stdout.lower()
    assert "error" not in result.stdout.lower(), result.stdout
