"""Uploads on the real server: curl-style multipart and Triton's load with files (HTTP and gRPC), versions
swapped under load, hostile names/keys/files, size cap, disconnects, kill -9 and restart. Every refused or
interrupted upload must leave the repository exactly as it was and the server serving what it served."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, external_data_helper, helper
from tritonclient.utils import InferenceServerException

from server.repository.upload import staging_entries
from tests.conftest import ServerProcess
from tests.e2e.conftest import reference_outputs
from tests.models import fixtures

CAP = 1_000_000
X = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


# ---- helpers ----------------------------------------------------------------------------------------


def model_bytes(seed: int = 0) -> bytes:
    return fixtures.float_mlp(seed=seed).SerializeToString()


def expected(seed: int, tmp_path: Path) -> np.ndarray:
    path = tmp_path / f"ref{seed}.onnx"
    path.write_bytes(model_bytes(seed))
    return reference_outputs(path, {"x": X})["y"]


def upload(server: ServerProcess, name: str, data: bytes, *, wait: bool = True, **fields: str) -> httpx.Response:
    """The curl upload: ``curl -F model=@model.onnx [-F config=...] [-F version=N] .../upload?wait=true``."""
    return httpx.post(
        f"{server.http_url}/v2/repository/models/{name}/upload",
        params={"wait": "true"} if wait else None,
        files={"model": ("model.onnx", data, "application/octet-stream")},
        data=fields,
        timeout=60,
    )


def infer(server: ServerProcess, name: str, version: str = "", protocol: str = "http") -> np.ndarray:
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_address if protocol == "http" else server.grpc_address)
    tensor = module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer(name, [tensor], model_version=version).as_numpy("y")


def snapshot(repo: Path) -> dict[str, int]:
    """Every path of the repository outside staging, with file sizes."""
    return {
        str(p.relative_to(repo)): (p.stat().st_size if p.is_file() else -1)
        for p in repo.rglob("*")
        if ".staging" not in p.relative_to(repo).parts
    }


def staging(repo: Path) -> list[str]:
    """Uploads left in staging (the repository-wide publish lock file is not one)."""
    return [p.name for p in staging_entries(repo)]


def wait_for(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_untouched(server: ServerProcess, repo: Path, before: dict[str, int]) -> None:
    """Nothing published, nothing left in staging, and the server still serves the base model."""
    wait_for(lambda: staging(repo) == [], what="staging to be cleaned")
    assert snapshot(repo) == before
    assert server.is_live()
    assert infer(server, "base").shape == (3, 4)


def index(server: ServerProcess) -> dict[tuple[str, str], dict[str, str]]:
    rows = httpx.post(f"{server.http_url}/v2/repository/index").json()
    return {(row["name"], row["version"]): row for row in rows}


def multipart_head(name: str, boundary: str = "xyzzy") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="model.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def start_raw_upload(server: ServerProcess, name: str, declared: int, payload: bytes) -> socket.socket:
    """Send the headers and part of a multipart body, and keep the connection open."""
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    head = (
        f"POST /v2/repository/models/{name}/upload HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary=xyzzy\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + multipart_head(name) + payload)
    return sock


def partial_upload_in_staging(repo: Path) -> bool:
    return any((repo / ".staging" / txn / "incoming" / "0" / "model.onnx").exists() for txn in staging(repo))


def custom_op_model() -> bytes:
    """Passes onnx.checker (an unknown domain is not checked) but onnxruntime cannot load it."""
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def external_model(location: str) -> bytes:
    """float_mlp whose w1 claims to live at ``location`` (512 bytes)."""
    model = fixtures.float_mlp()
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=512)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return model.SerializeToString()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upload_repo")
    fixtures.write_model(root, "base", fixtures.float_mlp())
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo, "--max-upload-bytes", str(CAP)).start()
    yield proc
    proc.stop()


# ---- uploads that work ------------------------------------------------------------------------------


def test_curl_upload_serves_like_onnxruntime(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    response = upload(server, "curl_m", model_bytes(1), config=json.dumps({"max_batch_size": 4}))
    assert response.status_code == 201, response.text
    assert response.json() == {"name": "curl_m", "version": "1", "state": "READY", "reason": ""}
    for protocol in ("http", "grpc"):
        np.testing.assert_allclose(infer(server, "curl_m", protocol=protocol), expected(1, tmp_path), rtol=1e-5)
    config = httpx.get(f"{server.http_url}/v2/models/curl_m/config").json()
    assert config["max_batch_size"] == 4
    # Without wait: 201 once the files are published, state LOADING; the next free version.
    response = upload(server, "curl_m", model_bytes(2), wait=False)
    assert response.status_code == 201 and response.json()["version"] == "2"
    assert response.json()["state"] in ("LOADING", "READY")
    wait_for(lambda: httpx.get(f"{server.http_url}/v2/models/curl_m/versions/2/ready").status_code == 200)
    np.testing.assert_allclose(infer(server, "curl_m"), expected(2, tmp_path), rtol=1e-5)
    # An explicit version; a taken one is refused (versions are never overwritten).
    assert upload(server, "curl_m", model_bytes(3), version="7").json()["version"] == "7"
    before = snapshot(repo)
    taken = upload(server, "curl_m", model_bytes(4), version="7")
    assert taken.status_code == 400 and "already exists" in taken.json()["error"]
    assert_untouched(server, repo, before)
    assert sorted(p.name for p in (repo / "curl_m").iterdir()) == ["1", "2", "7", "config.json"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_load_with_files(server: ServerProcess, repo: Path, tmp_path: Path, protocol: str) -> None:
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_address if protocol == "http" else server.grpc_address)
    name = f"triton_{protocol}"
    client.load_model(name, config=json.dumps({"max_batch_size": 8}), files={"file:1/model.onnx": model_bytes(5)})
    assert client.is_model_ready(name, "1")
    np.testing.assert_allclose(infer(server, name, protocol=protocol), expected(5, tmp_path), rtol=1e-5)
    # The same key again adds version 2; the default policy (latest 1) swaps to it.
    client.load_model(name, config=json.dumps({"max_batch_size": 8}), files={"file:1/model.onnx": model_bytes(6)})
    assert client.is_model_ready(name, "2") and not client.is_model_ready(name, "1")
    np.testing.assert_allclose(infer(server, name, protocol=protocol), expected(6, tmp_path), rtol=1e-5)
    # Unload stops serving but keeps the files; a plain load serves them again.
    client.unload_model(name)
    assert not client.is_model_ready(name)
    assert (repo / name / "2" / "model.onnx").is_file()
    client.load_model(name)
    assert client.is_model_ready(name, "2")


def test_external_data_upload(server: ServerProcess, tmp_path: Path) -> None:
    model = fixtures.float_mlp(seed=8)
    external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, str(tmp_path / "model.onnx"))
    files = {f"file:1/{name}": (tmp_path / name).read_bytes() for name in ("model.onnx", "weights.bin")}
    httpclient.InferenceServerClient(server.http_address).load_model("external", config="{}", files=files)
    np.testing.assert_allclose(infer(server, "external"), expected(8, tmp_path), rtol=1e-5)


def test_new_version_under_load_fails_no_request(server: ServerProcess, tmp_path: Path) -> None:
    assert upload(server, "live", model_bytes(11)).status_code == 201
    old, new = expected(11, tmp_path), expected(12, tmp_path)
    stop = threading.Event()
    results: list[str] = []

    def generate_load() -> None:
        client = httpclient.InferenceServerClient(server.http_address)
        tensor = httpclient.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        while not stop.is_set():
            try:
                out = client.infer("live", [tensor]).as_numpy("y")
                results.append("old" if np.allclose(out, old, rtol=1e-5) else "new" if np.allclose(out, new) else "?")
            except InferenceServerException as exc:
                results.append(f"failed: {exc}")

    threads = [threading.Thread(target=generate_load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    response = upload(server, "live", model_bytes(12))
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert response.status_code == 201 and response.json()["state"] == "READY"
    failures = [r for r in results if r not in ("old", "new")]
    assert not failures, failures[:5]
    assert results.count("old") > 10 and results.count("new") > 10 and results[-1] == "new"


# ---- hostile or broken uploads ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", ".staging", "a" * 129, "-x", "a%00b"])
def test_traversal_model_names(server: ServerProcess, repo: Path, name: str) -> None:
    before = snapshot(repo)
    response = upload(server, name, model_bytes())
    assert response.status_code in (400, 404), (name, response.status_code)
    assert "error" in response.json()
    body = {"parameters": {"file:1/model.onnx": "AAAA"}}
    response = httpx.post(f"{server.http_url}/v2/repository/models/{name}/load", json=body)
    assert response.status_code in (400, 404) and "error" in response.json()
    assert_untouched(server, repo, before)


BAD_KEYS = [
    "../etc",
    "a/../b",
    "/etc/passwd",
    "1/../../x.onnx",
    "1/../model.onnx",
    "0/model.onnx",
    "warmup/../x",
    ".hidden",
    "7",
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_traversal_file_keys(server: ServerProcess, repo: Path, protocol: str) -> None:
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_address if protocol == "http" else server.grpc_address)
    before = snapshot(repo)
    for key in BAD_KEYS:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("keys", config="{}", files={f"file:{key}": model_bytes()})
        assert "file key" in str(refused.value), key
        status = refused.value.status()
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (key, status)
    assert_untouched(server, repo, before)


def test_external_data_outside_is_never_read(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    secret, control = tmp_path / "secret.bin", tmp_path / "control.bin"
    for path in (secret, control):
        path.write_bytes(b"\1" * 512)
        mtime = path.stat().st_mtime
        os.utime(path, (mtime - 3600, mtime))  # atime < mtime: with relatime, any read updates it
    atime = secret.stat().st_atime
    climb = "../" * 40
    locations = [climb + str(secret).lstrip("/"), str(secret), "../../../../etc/passwd", climb + "etc/passwd"]
    client = httpclient.InferenceServerClient(server.http_address)
    before = snapshot(repo)
    for location in locations:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("exfil", config="{}", files={"file:1/model.onnx": external_model(location)})
        assert refused.value.status() == "400" and "external data" in str(refused.value), location
    response = upload(server, "exfil", external_model(str(secret)))
    assert response.status_code == 400 and "external data" in response.json()["error"]
    assert_untouched(server, repo, before)
    assert secret.stat().st_atime == atime, "the server read the file an external-data location pointed at"
    control.read_bytes()
    if control.stat().st_atime == atime:
        pytest.skip("this filesystem does not update atime on read; the atime assertion proves nothing here")


@pytest.mark.parametrize(
    ("content", "filename", "status"),
    [
        (os.urandom(4096), "model.onnx", 400),
        (b"", "model.onnx", 400),
        (pickle.dumps({"state_dict": [1.0, 2.0]}), "model.onnx", 415),
        (model_bytes(), "model.pkl", 415),
        (b"PK\x03\x04" + os.urandom(100), "model.onnx", 415),
    ],
    # Random bytes must not become part of the id: every pytest-xdist worker would collect a different test.
    ids=["random-bytes", "empty", "pickle", "onnx-named-pkl", "zip-with-random-bytes"],
)
def test_bad_files_are_refused(server: ServerProcess, repo: Path, content: bytes, filename: str, status: int) -> None:
    before = snapshot(repo)
    response = httpx.post(
        f"{server.http_url}/v2/repository/models/badfile/upload", files={"model": (filename, content)}, timeout=30
    )
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert_untouched(server, repo, before)


def test_not_multipart_is_415(server: ServerProcess, repo: Path) -> None:
    before = snapshot(repo)
    response = httpx.post(f"{server.http_url}/v2/repository/models/m/upload", content=model_bytes())
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]
    assert_untouched(server, repo, before)


def test_upload_over_the_cap(server: ServerProcess, repo: Path) -> None:
    before = snapshot(repo)
    big = os.urandom(CAP + 1)
    response = upload(server, "toobig", big)  # declared Content-Length over the cap: refused before reading
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert_untouched(server, repo, before)

    # Chunked (no Content-Length): refused as the bytes pass the cap while streaming.
    head, tail = multipart_head("toobig"), b"\r\n--xyzzy--\r\n"

    def chunks() -> Iterator[bytes]:
        yield head
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]
        yield tail

    try:
        response = httpx.post(
            f"{server.http_url}/v2/repository/models/toobig/upload",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyzzy"},
            timeout=30,
        )
        assert response.status_code == 413
    except httpx.TransportError:
        pass  # the server may answer 413 and close while the client still writes
    assert_untouched(server, repo, before)
    # Triton's load path has the same cap.
    with pytest.raises(InferenceServerException) as refused:
        httpclient.InferenceServerClient(server.http_address).load_model("toobig", files={"file:1/model.onnx": big})
    assert refused.value.status() == "413"
    assert_untouched(server, repo, before)


def test_client_disconnect_halfway(server: ServerProcess, repo: Path) -> None:
    before = snapshot(repo)
    sock = start_raw_upload(server, "gone", declared=600_000, payload=os.urandom(200_000))
    wait_for(lambda: partial_upload_in_staging(repo), what="the upload to reach staging")
    sock.close()
    assert_untouched(server, repo, before)


def test_failed_load_keeps_the_previous_version(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    assert upload(server, "fragile", model_bytes(21)).status_code == 201
    before = snapshot(repo)
    response = upload(server, "fragile", custom_op_model())
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["state"] == "UNAVAILABLE" and body["version"] == "2" and body["error"] == body["reason"]
    assert "com.example" in body["reason"] or "Mystery" in body["reason"]
    # The failed version is withdrawn from disk; version 1 keeps serving; the index says why.
    assert_untouched(server, repo, before)
    np.testing.assert_allclose(infer(server, "fragile"), expected(21, tmp_path), rtol=1e-5)
    rows = index(server)
    assert rows[("fragile", "1")]["state"] == "READY"
    assert rows[("fragile", "2")]["state"] == "UNAVAILABLE" and rows[("fragile", "2")]["reason"]
    # Triton's path: 400 with the reason. A brand-new model that fails leaves no folder and the server ready.
    with pytest.raises(InferenceServerException) as refused:
        grpcclient.InferenceServerClient(server.grpc_address).load_model(
            "doomed", config="{}", files={"file:1/model.onnx": custom_op_model()}
        )
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert not (repo / "doomed").exists()
    assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 200


def test_interleaved_uploads_and_unloads_stay_consistent(server: ServerProcess, repo: Path, tmp_path: Path) -> None:
    cycles = 100

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
            files = {"model": ("model.onnx", model_bytes(31))}

            async def one_upload() -> int:
                response = await client.post("/v2/repository/models/churn/upload?wait=true", files=files)
                assert response.status_code == 201 and response.json()["state"] == "READY", response.text
                return int(response.json()["version"])

            async def one_unload() -> None:
                response = await client.post("/v2/repository/models/churn/unload")
                assert response.status_code in (200, 404), response.text

            versions: list[int] = []
            for _ in range(cycles):
                version, _ = await asyncio.gather(one_upload(), one_unload())
                versions.append(version)
            return versions

    versions = asyncio.run(run())
    assert sorted(versions) == list(range(1, cycles + 1))
    assert staging(repo) == []
    folders = sorted(int(p.name) for p in (repo / "churn").iterdir())
    assert folders == list(range(1, cycles + 1))
    assert all(snapshot(repo)[f"churn/{v}/model.onnx"] == len(model_bytes(31)) for v in folders)
    grpcclient.InferenceServerClient(server.grpc_address).load_model("churn")
    assert httpx.get(f"{server.http_url}/v2/models/churn/versions/{cycles}/ready").status_code == 200
    np.testing.assert_allclose(infer(server, "churn"), expected(31, tmp_path), rtol=1e-5)
    assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 200


# ---- crash and restart ------------------------------------------------------------------------------


def test_kill9_mid_upload_then_restart(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    server = start_server(repo)
    assert upload(server, "kept", model_bytes(41), config=json.dumps({"max_batch_size": 3})).status_code == 201
    httpclient.InferenceServerClient(server.http_address).load_model(
        "kept", config=json.dumps({"max_batch_size": 3}), files={"file:1/model.onnx": model_bytes(42)}
    )
    before = snapshot(repo)
    sockets = [
        start_raw_upload(server, "kept", declared=3_000_000, payload=os.urandom(1_500_000)),
        start_raw_upload(server, "brand_new", declared=3_000_000, payload=os.urandom(100_000)),
    ]
    wait_for(lambda: len(staging(repo)) == 2 and partial_upload_in_staging(repo), what="uploads in staging")
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    for sock in sockets:
        sock.close()
    assert snapshot(repo) == before, "a killed upload must not be visible in the repository"
    assert len(staging(repo)) == 2
    # Restart: staging is cleaned, and everything uploaded before serves again without re-uploading.
    restarted = start_server(repo)
    assert staging(repo) == [] and snapshot(repo) == before
    np.testing.assert_allclose(infer(restarted, "kept"), expected(42, tmp_path), rtol=1e-5)
    assert httpx.get(f"{restarted.http_url}/v2/models/kept/config").json()["max_batch_size"] == 3
    assert infer(restarted, "base").shape == (3, 4)
    assert {row["state"] for row in index(restarted).values()} == {"READY"}


def test_upload_streams_to_disk_not_memory(start_server, tmp_path: Path) -> None:
    """64 MiB through the multipart path: the server's memory stays flat while the body streams in."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    server = start_server(repo)
    assert server.proc is not None

    def rss_mib() -> float:
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024

    chunk, size_mib, growth = os.urandom(1 << 20), 64, []
    before = rss_mib()

    def body() -> Iterator[bytes]:
        yield multipart_head("big")
        for _ in range(size_mib):
            yield chunk
        wait_for(lambda: partial_upload_in_staging(repo), what="staged bytes")
        time.sleep(0.3)
        growth.append(rss_mib() - before)
        yield b"\r\n--xyzzy--\r\n"

    response = httpx.post(
        f"{server.http_url}/v2/repository/models/big/upload",
        content=body(),
        headers={"content-type": "multipart/form-data; boundary=xyzzy"},
        timeout=120,
    )
    assert response.status_code == 400  # random bytes: refused after streaming
    assert growth and growth[0] < size_mib / 2, f"server memory grew {growth[0]:.0f} MiB for a {size_mib} MiB upload"
    assert staging(repo) == [] and not (repo / "big").exists()


def test_write_failure_leaves_nothing(start_server, tmp_path: Path) -> None:
    """A write that fails mid-upload (a file-size limit set on the running server stands in for a full
    disk: both make write() fail) gives 500, leaves nothing behind, and the server keeps serving."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    server = start_server(repo)
    assert server.proc is not None
    before = snapshot(repo)
    limit = 300_000
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        big = fixtures.slow_model(size=384, repeats=1).SerializeToString()  # ~590 KB, a valid model
        assert len(big) > limit
        for response in (
            upload(server, "full", big),
            httpx.post(
                f"{server.http_url}/v2/repository/models/full/load",
                json={"parameters": {"file:1/model.onnx": base64.b64encode(big).decode()}},
            ),
        ):
            assert response.status_code == 500, response.text
            assert "File too large" in response.json()["error"]
            assert_untouched(server, repo, before)
    finally:
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert upload(server, "full", big).status_code == 201
