"""server.repository.upload and server.repository.modelfile: file keys, version numbering, ONNX and external-data
checks (the files they refuse are never opened), staging, the commit protocol and its recovery after a crash."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pickle
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, external_data_helper

from server.errors import InvalidInput, LoadFailed, PayloadTooLarge, UnsupportedMediaType
from server.http.multipart import form_receiver, multipart_boundary
from server.repository import upload as upload_module
from server.repository.modelfile import check_external_data, model_tensors, sniff_format
from server.repository.upload import (
    MARKER,
    STAGING,
    StagedUpload,
    apply_committed,
    assign_versions,
    files_receiver,
    parse_file_key,
    parse_version,
    publish_lock,
    recover_staging,
    staging_entries,
)
from tests.models import fixtures

# ---- file keys and versions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("1/model.onnx", (1, "model.onnx")),
        ("12/weights.bin", (12, "weights.bin")),
        ("3/m-1_a.onnx.data", (3, "m-1_a.onnx.data")),
    ],
)
def test_good_file_keys(key: str, expected: tuple[int, str]) -> None:
    assert parse_file_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "../etc",
        "a/../b",
        "/etc/passwd",
        "1/../../x.onnx",
        "1/../model.onnx",
        "0/model.onnx",
        "01/model.onnx",
        "-1/model.onnx",
        "1/.hidden",
        "1/sub/model.onnx",
        "1/",
        "1/..",
        "1/a\\b.onnx",
        "1/model.onnx\x00",
        "99999999999999999999/model.onnx",
    ],
)
def test_bad_file_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput):
        parse_file_key(key)


@pytest.mark.parametrize("name", ["model.pkl", "model.PT", "weights.pth", "m.joblib", "m.pickle"])
def test_pickle_file_names_are_unsupported(name: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_file_key(f"1/{name}")


@pytest.mark.parametrize("text", ["0", "-2", "01", "1.5", "x", "", "99999999999999999999"])
def test_bad_versions(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_version(text)


def test_assign_versions() -> None:
    assert assign_versions([0], set(), None) == {0: 1}
    assert assign_versions([0], {1, 2, 7}, None) == {0: 8}
    assert assign_versions([0], {1, 2}, 5) == {0: 5}
    with pytest.raises(InvalidInput, match="already exists"):
        assign_versions([0], {1, 2}, 2)
    # Triton keys keep their number when it is free, else take the next free one (never overwrite).
    assert assign_versions([1], set(), None) == {1: 1}
    assert assign_versions([1], {1, 2, 3}, None) == {1: 4}
    assert assign_versions([5], {1, 2, 3}, None) == {5: 5}
    assert assign_versions([1, 2], {1}, None) == {1: 2, 2: 3}


# ---- ONNX checks ------------------------------------------------------------------------------------


def _external_model(location: str, length: int = 512) -> onnx.ModelProto:
    """float_mlp whose w1 (8x16 float32 = 512 bytes) claims to live in external data at ``location``."""
    model = fixtures.float_mlp()
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=length)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    return model


@pytest.fixture
def opened_paths() -> Iterator[list[str]]:
    """Every path Python opens while the test runs (an audit hook; hooks cannot be removed, so it is
    switched off after the test)."""
    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    yield seen
    active[0] = False


@pytest.mark.parametrize(
    "location",
    ["../../../../etc/passwd", "/etc/passwd", "../secret.bin", "sub/../../secret.bin", "..\\secret.bin", ""],
)
def test_external_data_outside_is_refused_unopened(tmp_path: Path, location: str, opened_paths: list[str]) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    (tmp_path / "m" / "secret.bin").write_bytes(b"\0" * 512)
    opened_paths.clear()
    with pytest.raises(InvalidInput, match="external data"):
        check_external_data(_external_model(location), version_dir, "m")
    assert not [p for p in opened_paths if "passwd" in p or "secret" in p]


def test_external_data_symlink_out_is_refused(tmp_path: Path, opened_paths: list[str]) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 512)
    (version_dir / "weights.bin").symlink_to(secret)
    opened_paths.clear()
    with pytest.raises(InvalidInput, match="outside"):
        check_external_data(_external_model("weights.bin"), version_dir, "m")
    assert str(secret) not in opened_paths
    secret.read_bytes()
    assert str(secret) in opened_paths, "the audit hook must see opens, or the assertion above proves nothing"


def test_external_data_inside_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 512)
    assert check_external_data(_external_model("weights.bin"), tmp_path, "m") == {"weights.bin"}
    with pytest.raises(InvalidInput, match="outside the 512-byte file"):
        check_external_data(_external_model("weights.bin", length=513), tmp_path, "m")
    with pytest.raises(InvalidInput, match="missing"):
        check_external_data(_external_model("other.bin"), tmp_path, "m")


def test_model_tensors_walks_subgraphs_and_attributes() -> None:
    inner = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "Constant", [], ["c"], value=onnx.helper.make_tensor("deep", TensorProto.FLOAT, [1], [1.0])
            )
        ],
        "body",
        [],
        [onnx.helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
    )
    node = onnx.helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=inner)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        initializer=[onnx.helper.make_tensor("top", TensorProto.FLOAT, [1], [2.0])],
    )
    names = [t.name for t in model_tensors(onnx.helper.make_model(graph))]
    assert names.count("deep") == 2 and "top" in names


@pytest.mark.parametrize(
    "content",
    [pickle.dumps({"weights": [1, 2]}, protocol=p) for p in (2, 4, 5)]
    + [b"PK\x03\x04rest-of-a-zip", b"\x89HDF\r\n\x1a\n....", b"\x93NUMPY\x01\x00"],
    ids=["pickle-protocol-2", "pickle-protocol-4", "pickle-protocol-5", "zip", "hdf5", "npy"],
)
def test_foreign_formats_are_unsupported(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(UnsupportedMediaType):
        sniff_format(path, "model.onnx")


# ---- staging, validation, publish -------------------------------------------------------------------


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if STAGING not in p.parts)


def _stage(root: Path, name: str, files: dict[str, bytes], config: str | None = None) -> StagedUpload:
    staged = StagedUpload(root, name, max_bytes=10 * 1024 * 1024)
    asyncio.run(files_receiver(files, config)(staged))
    return staged


def _model_bytes(seed: int = 0) -> bytes:
    return fixtures.float_mlp(seed=seed).SerializeToString()


def test_publish_new_model_then_new_version(tmp_path: Path) -> None:
    staged = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes()}, config=json.dumps({"max_batch_size": 4}))
    staged.validate(32)
    assert staged.publish_now() == [1]
    assert _tree(tmp_path) == ["m", "m/1", "m/1/model.onnx", "m/config.json"]
    assert staging_entries(tmp_path) == []
    # The same key again becomes version 2; a config.pbtxt is replaced by the uploaded config.json.
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 2")
    staged = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes(1)}, config="{}")
    staged.validate(32)
    assert staged.publish_now() == [2]
    assert _tree(tmp_path) == ["m", "m/1", "m/1/model.onnx", "m/2", "m/2/model.onnx", "m/config.json"]
    assert (tmp_path / "m" / "config.json").read_text() == "{}"
    assert (tmp_path / "m" / "2" / "model.onnx").read_bytes() == _model_bytes(1)


def test_publishing_waits_for_the_repository_publish_lock(tmp_path: Path) -> None:
    """Two servers on one repository publish one at a time (the model's asyncio lock orders one server's
    loads only): uploads queued behind another server's publish get distinct versions, each its own bytes."""
    uploads = [_stage(tmp_path, "race", {"1/model.onnx": _model_bytes(seed)}) for seed in (1, 2)]
    for staged in uploads:
        staged.validate(32)
    with publish_lock(tmp_path):  # what another server holds while it publishes
        threads = [threading.Thread(target=staged.publish_now) for staged in uploads]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        assert all(thread.is_alive() for thread in threads) and not (tmp_path / "race").exists()
    for thread in threads:
        thread.join(10)
    assert sorted(v for staged in uploads for v in staged.versions) == [1, 2]
    for seed, staged in zip((1, 2), uploads, strict=True):
        assert (tmp_path / "race" / str(staged.versions[0]) / "model.onnx").read_bytes() == _model_bytes(seed)
    assert staging_entries(tmp_path) == []


def test_withdraw_restores_the_repository(tmp_path: Path) -> None:
    staged = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes()})
    staged.validate(32)
    staged.publish_now()
    before = _tree(tmp_path)
    again = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes(2)})
    again.validate(32)
    assert again.publish_now() == [2]
    again.withdraw_now()
    assert _tree(tmp_path) == before and staging_entries(tmp_path) == []
    # Withdrawing an upload that created the model removes the model folder.
    fresh = _stage(tmp_path, "fresh", {"1/model.onnx": _model_bytes()})
    fresh.validate(32)
    fresh.publish_now()
    fresh.withdraw_now()
    assert _tree(tmp_path) == before and staging_entries(tmp_path) == []


def test_publish_refuses_a_model_folder_linked_outside(tmp_path: Path) -> None:
    outside, repo = tmp_path / "outside", tmp_path / "repo"
    outside.mkdir()
    repo.mkdir()
    (repo / "m").symlink_to(outside)
    staged = _stage(repo, "m", {"1/model.onnx": _model_bytes()})
    with pytest.raises(InvalidInput, match="outside the model repository"):
        staged.validate(32)  # refused already here: the model's current config is never read through the link
    with pytest.raises(InvalidInput, match="outside the model repository"):
        staged.publish_now()
    staged.discard()
    assert list(outside.iterdir()) == [] and staging_entries(repo) == []


@pytest.mark.parametrize(
    ("files", "config", "error", "match"),
    [
        ({"1/model.onnx": os.urandom(2000)}, None, InvalidInput, "not a valid ONNX"),
        ({"1/model.onnx": pickle.dumps([1, 2, 3])}, None, UnsupportedMediaType, "pickle"),
        ({"1/other.onnx": _model_bytes()}, None, InvalidInput, "model file is missing"),
        ({"1/model.onnx": _model_bytes(), "1/extra.bin": b"x"}, None, InvalidInput, "neither the model"),
        ({"1/model.onnx": _model_bytes()}, '{"input": [{"name": "nope"}]}', LoadFailed, "nope"),
        ({"1/model.onnx": _model_bytes()}, "{not json", LoadFailed, "config.json"),
        ({"1/model.onnx": _external_model("../../x").SerializeToString()}, None, InvalidInput, "external data"),
    ],
)
def test_invalid_uploads_are_refused(tmp_path: Path, files: dict, config: str | None, error: type, match: str) -> None:
    staged = _stage(tmp_path, "m", files, config)
    with pytest.raises(error, match=match):
        staged.validate(32)
    staged.discard()
    assert _tree(tmp_path) == [] and staging_entries(tmp_path) == []


def test_checker_failure_is_refused(tmp_path: Path) -> None:
    model = fixtures.float_mlp()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 7  # Gemm with 8x16 weights: mismatch
    staged = _stage(tmp_path, "m", {"1/model.onnx": model.SerializeToString()})
    with pytest.raises(InvalidInput, match="ONNX checker"):
        staged.validate(32)
    staged.discard()


def test_external_data_upload_is_accepted(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    model = fixtures.float_mlp()
    external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, str(source / "model.onnx"))
    files = {f"1/{p.name}": p.read_bytes() for p in source.iterdir()}
    repo = tmp_path / "repo"
    staged = _stage(repo, "m", files)
    staged.validate(32)
    assert staged.publish_now() == [1]
    assert _tree(repo) == ["m", "m/1", "m/1/model.onnx", "m/1/weights.bin"]


def test_size_cap(tmp_path: Path) -> None:
    staged = StagedUpload(tmp_path, "m", max_bytes=100)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(files_receiver({"1/model.onnx": b"x" * 101}, None)(staged))
    staged.discard()
    assert staging_entries(tmp_path) == []


def test_full_disk_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(self: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(upload_module.StagedFile, "write", no_space)
    staged = StagedUpload(tmp_path, "m", max_bytes=1 << 20)
    with pytest.raises(OSError, match="No space"):
        asyncio.run(files_receiver({"1/model.onnx": _model_bytes()}, None)(staged))
    staged.discard()
    assert _tree(tmp_path) == [] and staging_entries(tmp_path) == []


# ---- crash recovery ---------------------------------------------------------------------------------


def test_recovery_removes_unfinished_and_finishes_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unfinished = _stage(tmp_path, "half", {"1/model.onnx": _model_bytes()})
    assert staging_entries(tmp_path) == [unfinished.dir]
    # A crash right after the commit marker: nothing renamed yet.
    crashed = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes()}, config="{}")
    crashed.validate(32)

    def crash(txn: Path, root: Path) -> None:
        raise SystemExit("kill -9")

    monkeypatch.setattr(upload_module, "apply_committed", crash)
    with pytest.raises(SystemExit):
        crashed.publish_now()
    assert (crashed.dir / MARKER).is_file() and _tree(tmp_path) == []
    crashed.discard()  # a committed upload is never thrown away: the next start finishes it
    assert (crashed.dir / MARKER).is_file()
    monkeypatch.undo()
    unfinished.release()  # the server that staged it died (its process held the lock)
    recover_staging(tmp_path)
    assert _tree(tmp_path) == ["m", "m/1", "m/1/model.onnx", "m/config.json"]
    assert staging_entries(tmp_path) == []


def test_recovery_leaves_a_live_servers_upload_alone(tmp_path: Path) -> None:
    """Several servers share one repository: one starting up must not delete or publish another's upload in
    flight (its staging lock is held), but does clean up the folders of a server that died."""
    in_flight = _stage(tmp_path, "live", {"1/model.onnx": _model_bytes()})
    committed = _stage(tmp_path, "busy", {"1/model.onnx": _model_bytes()})
    committed.validate(32)
    dead = _stage(tmp_path, "dead", {"1/model.onnx": _model_bytes()})
    dead.release()
    stray = tmp_path / STAGING / "stray-file"
    stray.write_text("x")
    # A live server's recovery runs in another process: the lock is per open file, so this one conflicts too.
    recover_staging(tmp_path)
    assert sorted(staging_entries(tmp_path)) == sorted([in_flight.dir, committed.dir])
    assert (in_flight.dir / "incoming" / "1" / "model.onnx").is_file()
    assert _tree(tmp_path) == []
    committed.publish_now()  # the live server goes on as if nothing happened
    committed.discard()
    assert _tree(tmp_path) == ["busy", "busy/1", "busy/1/model.onnx"]
    in_flight.discard()
    assert staging_entries(tmp_path) == []


def test_staging_folder_deleted_before_its_lock_is_taken_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another server's recovery may lock and delete a staging folder between its mkdir and our lock."""
    real_open = os.open
    raced = []

    def racing_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if str(path).endswith(upload_module.LOCK_FILE) and not raced:
            raced.append(path)
            recover_staging(tmp_path)  # sees an unlocked, empty folder: deletes it
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(upload_module.os, "open", racing_open)
    staged = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes()})
    monkeypatch.undo()
    assert raced and staged.dir.is_dir() and str(raced[0]).startswith(str(tmp_path / STAGING))
    assert not str(raced[0]).startswith(str(staged.dir))
    staged.discard()


def test_apply_is_idempotent_after_a_partial_roll_forward(tmp_path: Path) -> None:
    first = _stage(tmp_path, "m", {"1/model.onnx": _model_bytes()})
    first.validate(32)
    first.publish_now()
    txn = tmp_path / STAGING / "t"
    (txn / "model" / "2").mkdir(parents=True)
    (txn / "model" / "2" / "model.onnx").write_bytes(_model_bytes(3))
    (txn / "model" / "3").mkdir()
    (txn / "model" / "3" / "model.onnx").write_bytes(_model_bytes(4))
    (txn / MARKER).write_text(json.dumps({"model": "m", "versions": [2, 3], "config": False}))
    os.rename(txn / "model" / "2", tmp_path / "m" / "2")  # the crash came after the first rename
    apply_committed(txn, tmp_path)
    assert _tree(tmp_path) == ["m", "m/1", "m/1/model.onnx", "m/2", "m/2/model.onnx", "m/3", "m/3/model.onnx"]
    assert not txn.exists()


# ---- the streamed multipart form --------------------------------------------------------------------

BOUNDARY = "b0undary"


def _form(*parts: tuple[str, bytes, str | None]) -> bytes:
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def _chunks(body: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _receive(tmp_path: Path, body: bytes, max_bytes: int = 1 << 20) -> StagedUpload:
    staged = StagedUpload(tmp_path, "m", max_bytes=max_bytes)
    receive = form_receiver(f"multipart/form-data; boundary={BOUNDARY}", _chunks(body), 1000)
    try:
        asyncio.run(receive(staged))
    except BaseException:
        staged.discard()
        raise
    return staged


def test_form_is_streamed_into_staging(tmp_path: Path) -> None:
    model = _model_bytes()
    body = _form(("version", b"7", None), ("model", model, "net.onnx"), ("config", b'{"max_batch_size": 2}', None))
    staged = _receive(tmp_path, body)
    assert (staged.incoming / "0" / "model.onnx").read_bytes() == model
    assert staged.requested_version == 7
    staged.validate(32)
    assert staged.publish_now() == [7]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"max_batch_size": 2}


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        (_form(("config", b"{}", None)), InvalidInput, "'model'"),
        (_form(("model", b"x", "m.onnx"), ("model", b"y", "m.onnx")), InvalidInput, "twice"),
        (_form(("model", b"x", "m.onnx"), ("path", b"/etc", None)), InvalidInput, "not known"),
        (_form(("model", b"x", "model.pkl")), UnsupportedMediaType, "pickle"),
        (_form(("model", b"x", "m.onnx"), ("version", b"0", None)), InvalidInput, "positive"),
        (_form(("model", b"x", "m.onnx"), ("config", b"{" * 2000, None)), PayloadTooLarge, "config"),
        (_form(("model", b"x" * 5000, "m.onnx")), PayloadTooLarge, "limit"),
        (_form(("model", b"x" * 100, "m.onnx"))[:-20], InvalidInput, "closing boundary"),
    ],
)
def test_bad_forms(tmp_path: Path, body: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _receive(tmp_path, body, max_bytes=4096)
    assert staging_entries(tmp_path) == []


@pytest.mark.parametrize("content_type", ["", "application/json", "multipart/form-data", "text/plain; boundary=x"])
def test_non_multipart_is_unsupported(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        multipart_boundary(content_type)
