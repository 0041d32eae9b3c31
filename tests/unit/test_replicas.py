"""Replica heartbeats on a shared repository: each replica's served versions, live or stale, and whether the
live ones have converged; the heartbeat folder is never a model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.repository.layout import Repository
from server.repository.replicas import MIN_STALE_S, Fleet, Served, check_replica_id, default_replica_id
from server.settings import Settings
from tests.models import fixtures


def _fleet(root: Path, replica: str, served: list[Served], ready: bool = True) -> Fleet:
    return Fleet(root, replica, 1.0, served=lambda: list(served), ready=lambda: ready, heartbeats=True)


def test_replicas_converge_when_they_serve_the_same_versions(tmp_path: Path) -> None:
    a_serves: list[Served] = [("m", 1, "original")]
    b_serves: list[Served] = []
    a, b = _fleet(tmp_path, "a", a_serves), _fleet(tmp_path, "b", b_serves, ready=False)
    a.beat()
    b.beat()
    status = a.status()
    assert (status["replica"], status["live"], status["stale"], status["converged"]) == ("a", 2, 0, False)
    rows = {row["replica"]: row for row in status["replicas"]}
    assert rows["a"]["self"] and not rows["b"]["self"] and not rows["b"]["ready"]
    assert rows["a"]["served"] == [{"name": "m", "version": "1", "variant": "original"}] and rows["b"]["served"] == []

    b_serves.append(("m", 1, "int8_dynamic"))  # b loaded it; its variant may differ while a optimizes
    b.beat()
    assert a.status()["converged"] and b.status()["converged"]
    assert b.status()["replicas"][0]["replica"] == "b"  # each replica lists itself first, from memory


def test_a_stale_heartbeat_is_reported_and_left_out_of_convergence(tmp_path: Path) -> None:
    a, gone = _fleet(tmp_path, "a", [("m", 2, "original")]), _fleet(tmp_path, "gone", [("m", 1, "original")])
    a.beat()
    gone.beat()
    data = json.loads(gone.path.read_text())
    data["updated"] = time.time() - MIN_STALE_S - 5
    gone.path.write_text(json.dumps(data))
    status = a.status()
    assert (status["live"], status["stale"], status["converged"]) == (1, 1, True)
    assert {row["replica"]: row["state"] for row in status["replicas"]} == {"a": "live", "gone": "stale"}
    families = {f.name: f for f in a.metric_families()}
    assert {s.labels["state"]: s.value for s in families["optiserve_fleet_replicas"].samples} == {
        "live": 1.0,
        "stale": 1.0,
    }
    assert families["optiserve_fleet_converged"].samples[0].value == 1.0


def test_torn_or_foreign_files_are_skipped_and_leave_removes_the_heartbeat(tmp_path: Path) -> None:
    a = _fleet(tmp_path, "a", [])
    a.beat()
    (a.folder / "torn.json").write_text('{"replica": "torn", "upd')
    (a.folder / "liar.json").write_text(json.dumps({**json.loads(a.path.read_text()), "replica": "other"}))
    assert [row["replica"] for row in _fleet(tmp_path, "b", []).status()["replicas"]] == ["b", "a"]
    a.leave()
    assert not a.path.exists()


def test_heartbeat_folder_is_not_a_model(tmp_path: Path) -> None:
    fixtures.write_model(tmp_path, "m", fixtures.float_mlp())
    _fleet(tmp_path, "a", [("m", 1, "original")]).beat()
    assert (tmp_path / ".optiserve" / "replicas" / "a.json").is_file()
    assert Repository(tmp_path).model_names() == ["m"]


def test_replica_ids_name_a_file_inside_the_folder() -> None:
    assert check_replica_id(default_replica_id()) == default_replica_id()
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            check_replica_id(bad)


def test_replica_id_setting_is_checked_at_start() -> None:
    assert Settings(replica_id="optiserve-7d9f-abcde").replica_id == "optiserve-7d9f-abcde"
    with pytest.raises(ValidationError, match="replica_id"):
        Settings(replica_id="../../etc/x")
