"""Many replicas on one repository (--model-control-mode poll): an upload through one server is served by
every server within the poll interval plus load time; a new version appears everywhere; a model folder
removed from the repository disappears everywhere; replicas sharing --cache-dir optimize a model once; the
replicas endpoint shows which versions each replica serves and when the fleet has converged; concurrent uploads
through two replicas get distinct whole versions; a replica killed mid-upload and restarted deletes nothing of
another replica's upload in flight."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess
from tests.e2e.test_upload import model_bytes, multipart_head, partial_upload_in_staging, staging, upload
from tests.models import fixtures

POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "1")
DEADLINE_S = 20.0


def _status(server: ServerProcess, path: str) -> int:
    return httpx.get(f"{server.http_url}{path}", timeout=5).status_code


def _eventually(servers: list[ServerProcess], path: str, want: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if all(want(_status(s, path)) for s in servers):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path}: {[_status(s, path) for s in servers]} after {DEADLINE_S}s")


X = np.arange(16, dtype=np.float32).reshape(2, 8)


def _infer(server: ServerProcess, name: str, version: str = "") -> np.ndarray:
    x = X
    url = f"{server.http_url}/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    reply = httpx.post(url, json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return np.asarray(reply.json()["outputs"][0]["data"], dtype=np.float32)


def test_upload_to_one_replica_is_served_by_all(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    a, b, c = (start_server(repo, *POLL) for _ in range(3))
    fleet = [a, b, c]

    assert upload(a, "fleet", model_bytes(1)).status_code == 201
    _eventually(fleet, "/v2/models/fleet/ready", lambda code: code == 200)
    served = [_infer(s, "fleet") for s in fleet]
    assert all(np.array_equal(served[0], out) for out in served[1:])

    # A new version through another replica replaces version 1 everywhere (latest 1).
    response = upload(b, "fleet", model_bytes(2))
    assert response.status_code == 201 and response.json()["version"] == "2"
    _eventually(fleet, "/v2/models/fleet/versions/2/ready", lambda code: code == 200)
    _eventually(fleet, "/v2/models/fleet/versions/1/ready", lambda code: code != 200)
    served = [_infer(s, "fleet", "2") for s in fleet]
    assert all(np.array_equal(served[0], out) for out in served[1:])
    assert not np.array_equal(served[0], _infer(a, "base"))

    # Removing the model folder unloads it everywhere; the other models keep serving.
    shutil.rmtree(repo / "fleet")
    _eventually(fleet, "/v2/models/fleet/ready", lambda code: code != 200)
    assert all(_status(s, "/v2/models/base/ready") == 200 for s in fleet)
    assert all(_status(s, "/v2/health/ready") == 200 for s in fleet)

    # As in Triton, what is served follows the repository: explicit load and unload are refused.
    reply = httpx.post(f"{a.http_url}/v2/repository/models/base/unload", timeout=5)
    assert reply.status_code == 400 and "poll" in reply.text
    assert _status(a, "/v2/models/base/ready") == 200


def test_none_mode_refuses_changes(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    server = start_server(repo, "--model-control-mode", "none")
    assert upload(server, "other", model_bytes(1)).status_code == 400
    assert httpx.post(f"{server.http_url}/v2/repository/models/base/unload", timeout=5).status_code == 400
    assert not (repo / "other").exists()
    assert _status(server, "/v2/models/base/ready") == 200


def _start_fleet(
    start_server: Any, repo: Path, flags: list[tuple[str, ...]], env: dict[str, str] | None = None
) -> list[ServerProcess]:
    """Replicas started side by side (each start imports the whole stack), then waited for."""
    fleet: list[ServerProcess] = [start_server(repo, *args, env=env, wait_ready=False) for args in flags]
    for server in fleet:
        server.wait_ready()
    return fleet


def _until(what: str, check: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not true after {deadline_s}s")


def _cache_counts(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "optiserve_optimizer_cache")
    return {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")}


def _report(server: ServerProcess, name: str) -> dict[str, Any]:
    reply = httpx.get(f"{server.http_url}/v2/models/{name}/optimization", timeout=5)
    return reply.json() if reply.status_code == 200 else {}


def test_the_optimizer_runs_once_for_replicas_sharing_the_cache(tmp_path: Path, start_server: Any) -> None:
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    # The optimizer starts at once (no wait for traffic samples) at normal priority, to keep the test short.
    env = {
        "OPTISERVE_CACHE_DIR": str(cache),
        "OPTISERVE_DEFAULT_PRECISION": "none",
        "OPTISERVE_OPTIMIZE_NICE": "0",
        "OPTISERVE_OPTIMIZE_TRAFFIC_WAIT_S": "0",
    }
    fleet = _start_fleet(start_server, repo, [(*POLL,)] * 3, env)
    a = fleet[0]

    # Background mode: each replica serves the original at once; one optimizes, the others wait for its lock (or
    # find its result) and swap in the same variant.
    config = {"optimize": {"precision": "fp32", "time_budget_s": 0.1}}
    assert upload(a, "opt", model_bytes(4), config=json.dumps(config)).status_code == 201
    _eventually(fleet, "/v2/models/opt/ready", lambda code: code == 200)
    _until(
        "every replica done optimizing",
        lambda: all(_report(s, "opt").get("phase") not in (None, "optimizing") for s in fleet),
        120,
    )

    reports = [_report(s, "opt") for s in fleet]
    found = [r["cache"] for r in reports]
    assert found.count("miss") == 1 and found.count("hit") + found.count("waited") == 2, found
    assert all(r["cache_hit"] == (r["cache"] != "miss") for r in reports)
    assert len({r["selected"] for r in reports}) == 1
    counts = [_cache_counts(s) for s in fleet]
    assert sum(c["miss"] for c in counts) == 1, counts
    assert sum(c["hit"] + c["waited"] for c in counts) == 2, counts
    served = [_infer(s, "opt") for s in fleet]
    assert all(np.allclose(served[0], out, atol=1e-5) for out in served[1:])
    assert not list((cache / "results").glob("*.lock"))


def _fleet_view(server: ServerProcess) -> dict[str, Any]:
    reply = httpx.get(f"{server.http_url}/v2/repository/replicas", timeout=5)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _serves(view: dict[str, Any], name: str) -> bool:
    return all(any(m["name"] == name for m in row["served"]) for row in view["replicas"] if row["state"] == "live")


def test_replicas_endpoint_shows_the_fleet_converging(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    ids = ["replica-a", "replica-b", "replica-c"]
    a, b, c = fleet = _start_fleet(start_server, repo, [(*POLL, "--replica-id", replica) for replica in ids])

    def converged_on(name: str, live: int) -> Callable[[], bool]:
        def check() -> bool:
            views = [_fleet_view(s) for s in fleet if s.proc is not None and s.proc.poll() is None]
            return all(v["converged"] and v["live"] == live and _serves(v, name) for v in views)

        return check

    _until("three replicas serving base", converged_on("base", 3))
    assert upload(a, "fleet", model_bytes(1)).status_code == 201
    _until("three replicas serving the upload", converged_on("fleet", 3))
    view = _fleet_view(b)
    assert view["replica"] == "replica-b" and view["replicas"][0]["self"]
    assert sorted(row["replica"] for row in view["replicas"]) == ids
    row = next(r for r in view["replicas"] if r["replica"] == "replica-a")
    assert {"name": "fleet", "version": "1", "variant": "original"} in row["served"] and row["ready"]
    assert sorted(p.name for p in (repo / ".optiserve" / "replicas").iterdir()) == [f"{i}.json" for i in ids]
    assert "fleet" in httpx.get(f"{a.http_url}/v2/models/fleet", timeout=5).text  # the folder is not a model
    assert all(r["name"] != ".optiserve" for r in httpx.post(f"{a.http_url}/v2/repository/index", timeout=5).json())

    # A clean exit removes its heartbeat; a killed replica's goes stale and leaves the convergence check.
    assert c.stop() == 0
    _until("replica-c left", lambda: _fleet_view(a)["live"] == 2 and _fleet_view(a)["stale"] == 0)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    _until("replica-b stale", lambda: _fleet_view(a)["stale"] == 1, 30)
    view = _fleet_view(a)
    assert view["live"] == 1 and view["converged"]
    assert {r["replica"]: r["state"] for r in view["replicas"]} == {"replica-a": "live", "replica-b": "stale"}
    metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{a.http_url}/metrics", timeout=5).text)}
    assert {s.labels["state"]: s.value for s in metrics["optiserve_fleet_replicas"].samples} == {"live": 1, "stale": 1}
    assert metrics["optiserve_fleet_converged"].samples[0].value == 1


def test_concurrent_uploads_through_two_replicas_stay_whole(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    a, b = _start_fleet(start_server, repo, [(*POLL,)] * 2)
    seeds = list(range(50, 58))
    replies: dict[int, httpx.Response] = {}

    def send(seed: int) -> None:
        replies[seed] = upload(a if seed % 2 else b, "race", model_bytes(seed))

    threads = [threading.Thread(target=send, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    # Each upload gets its own version, or a clear conflict; every published folder holds exactly one upload's bytes.
    assert all(r.status_code in (201, 409) for r in replies.values()), {s: r.text for s, r in replies.items()}
    published = {int(r.json()["version"]): seed for seed, r in replies.items() if r.status_code == 201}
    assert published, "no upload succeeded"
    accepted = [seed for seed, r in replies.items() if r.status_code == 201]
    assert len(published) == len(accepted), f"two uploads were told the same version: {replies}"
    on_disk = sorted(int(p.name) for p in (repo / "race").iterdir() if p.name.isdigit())
    assert on_disk == sorted(published)
    for version, seed in published.items():
        assert (repo / "race" / str(version) / "model.onnx").read_bytes() == model_bytes(seed)
    latest = max(published)
    _eventually([a, b], f"/v2/models/race/versions/{latest}/ready", lambda code: code == 200)
    want = _reference(model_bytes(published[latest]))
    for server in (a, b):
        np.testing.assert_allclose(_infer(server, "race", str(latest)).reshape(want.shape), want, rtol=1e-5)
    assert staging(repo) == []


def _reference(model: bytes) -> np.ndarray:
    """What onnxruntime in this process gives for X."""
    return np.asarray(ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0])


def _slow_upload(server: ServerProcess, name: str, data: bytes) -> tuple[socket.socket, bytes]:
    """An upload (?wait=true) whose first half of the body is sent; returns the socket and the rest to send."""
    body = multipart_head(name) + data + b"\r\n--xyzzy--\r\n"
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    head = (
        f"POST /v2/repository/models/{name}/upload?wait=true HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary=xyzzy\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def _padded_model(seed: int) -> bytes:
    """A valid model of about 1 MB, so half of it is in staging while the rest has not been sent."""
    model = fixtures.float_mlp(seed=seed)
    model.doc_string = "x" * 1_000_000
    return model.SerializeToString()


def test_replica_killed_mid_upload_leaves_the_others_alone(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    a, b = _start_fleet(start_server, repo, [(*POLL,)] * 2)
    from_a, rest_a = _slow_upload(a, "from_a", _padded_model(61))
    from_b, _ = _slow_upload(b, "from_b", _padded_model(62))
    _until("both uploads in staging", lambda: len(staging(repo)) == 2 and partial_upload_in_staging(repo))
    in_flight = set(staging(repo))
    assert b.proc is not None
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    from_b.close()

    # B's restart recovers the upload its previous process abandoned, and leaves A's (locked by A) alone.
    restarted = start_server(repo, *POLL)
    left = set(staging(repo))
    assert len(left) == 1 and left < in_flight
    from_a.sendall(rest_a)
    reply = from_a.makefile("rb").readline()
    from_a.close()
    assert reply.split()[1] == b"201", reply
    _eventually([a, restarted], "/v2/models/from_a/ready", lambda code: code == 200)
    want = _reference(_padded_model(61))
    for server in (a, restarted):
        np.testing.assert_allclose(_infer(server, "from_a").reshape(want.shape), want, rtol=1e-5)
    assert not (repo / "from_b").exists() and staging(repo) == []
    assert (repo / "from_a" / "1" / "model.onnx").read_bytes() == _padded_model(61)
