"""Model-level files in uploads (label files, ``warmup/`` data) and a version's ``samples.npz``: their keys,
the checks against the config, staging and publishing with the rest of the upload, and the curl form."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from server.errors import InvalidInput, UnsupportedMediaType
from server.http.multipart import form_receiver
from server.repository.upload import StagedUpload, files_receiver, parse_file_key, staging_entries
from tests.models import fixtures

LABELED = {
    "max_batch_size": 4,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [8]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [5], "label_filename": "labels.txt"}],
}
WARMED = {
    "max_batch_size": 4,
    "model_warmup": [
        {
            "name": "w",
            "batch_size": 1,
            "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [8], "input_data_file": "x.bin"}},
        }
    ],
}


def _model() -> bytes:
    return fixtures.float_mlp(classes=5, seed=3).SerializeToString()


def _stage(root: Path, files: dict[str, bytes], config: dict | None = None) -> StagedUpload:
    staged = StagedUpload(root, "m", max_bytes=10 * 1024 * 1024)
    asyncio.run(files_receiver(files, None if config is None else json.dumps(config))(staged))
    return staged


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("labels.txt", (None, "labels.txt")),
        ("warmup/x.bin", (None, "warmup/x.bin")),
        ("1/samples.npz", (1, "samples.npz")),
    ],
)
def test_model_level_keys(key: str, expected: tuple[int | None, str]) -> None:
    assert parse_file_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "warmup/../x",
        "/x",
        "/etc/passwd",
        ".hidden",
        "warmup/.x",
        "warmup/a/b",
        "other/x",
        "warmup",
        "warmup/",
        "config.json",
        "config.pbtxt",
        "7",
        "a\\b",
        "",
    ],
)
def test_bad_model_level_keys(key: str) -> None:
    with pytest.raises(InvalidInput):
        parse_file_key(key)


def test_pickle_names_at_model_level() -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_file_key("warmup/x.pkl")


def test_labels_and_warmup_are_published_with_the_version(tmp_path: Path) -> None:
    staged = _stage(tmp_path, {"1/model.onnx": _model(), "labels.txt": b"a\nb\n"}, LABELED)
    staged.validate(32)
    assert staged.publish_now() == [1]
    assert (tmp_path / "m" / "labels.txt").read_bytes() == b"a\nb\n"
    assert not staging_entries(tmp_path)
    # A second upload replaces the label file and adds warmup data beside what is there.
    (tmp_path / "m" / "warmup").mkdir()
    (tmp_path / "m" / "warmup" / "old.bin").write_bytes(b"o")
    config = {**LABELED, **WARMED}
    staged = _stage(tmp_path, {"1/model.onnx": _model(), "labels.txt": b"c\n", "warmup/x.bin": b"\0" * 32}, config)
    staged.validate(32)
    assert staged.publish_now() == [2]
    assert (tmp_path / "m" / "labels.txt").read_bytes() == b"c\n"
    assert sorted(p.name for p in (tmp_path / "m" / "warmup").iterdir()) == ["old.bin", "x.bin"]


def test_a_referred_file_already_in_the_model_folder_is_enough(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "labels.txt").write_bytes(b"a\n")
    staged = _stage(tmp_path, {"1/model.onnx": _model()}, LABELED)
    staged.validate(32)


@pytest.mark.parametrize(
    ("files", "config", "match"),
    [
        ({}, LABELED, r"output\[0\]\.label_filename: labels.txt is neither uploaded"),
        ({}, WARMED, r"model_warmup\[0\]\.inputs\['x'\]\.input_data_file: warmup/x.bin"),
        ({"names.txt": b"a"}, LABELED, "not referred to"),
        ({"samples.npz": _npz(x=np.zeros((2, 8), np.float32))}, {}, "version folder"),
        ({"1/samples.npz": b"not a zip"}, {}, "samples.npz: not a .npz"),
        ({"1/samples.npz": _npz(x=np.array([{"a": 1}], dtype=object))}, {}, "samples.npz: not a .npz"),
    ],
)
def test_refused(tmp_path: Path, files: dict[str, bytes], config: dict, match: str) -> None:
    staged = _stage(tmp_path, {"1/model.onnx": _model(), **files}, config)
    with pytest.raises(InvalidInput, match=match):
        staged.validate(32)
    staged.discard()
    assert not (tmp_path / "m").exists()


def test_samples_beside_the_model(tmp_path: Path) -> None:
    staged = _stage(tmp_path, {"1/model.onnx": _model(), "1/samples.npz": _npz(x=np.zeros((2, 8), np.float32))})
    staged.validate(32)
    staged.publish_now()
    assert sorted(p.name for p in (tmp_path / "m" / "1").iterdir()) == ["model.onnx", "samples.npz"]


BOUNDARY = "b0undary"


def _form(*parts: tuple[str, bytes, str | None]) -> bytes:
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("size", [5, 1 << 20])  # several parts in one chunk, or one part over many
def test_form_with_extra_files(tmp_path: Path, size: int) -> None:
    samples = _npz(x=np.zeros((2, 8), np.float32))
    body = _form(
        ("model", _model(), "net.onnx"),
        ("file", b"a\nb\n", "labels.txt"),
        ("file", b"\0" * 32, "warmup/x.bin"),
        ("samples", samples, "mine.npz"),
        ("config", json.dumps({**LABELED, **WARMED}).encode(), None),
    )
    staged = StagedUpload(tmp_path, "m", max_bytes=1 << 20)
    asyncio.run(form_receiver(f"multipart/form-data; boundary={BOUNDARY}", _chunks(body, size), 100000)(staged))
    staged.validate(32)
    assert staged.publish_now() == [1]
    root = tmp_path / "m"
    assert (root / "labels.txt").read_bytes() == b"a\nb\n"
    assert (root / "warmup" / "x.bin").read_bytes() == b"\0" * 32
    assert (root / "1" / "samples.npz").read_bytes() == samples
    assert (root / "1" / "model.onnx").read_bytes() == _model()


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ((("file", b"x", "../x"),), "plain file name"),
        ((("file", b"x", "warmup/../x"),), "plain file name"),
        ((("file", b"x", "/etc/passwd"),), "file"),
        ((("file", b"x", ".hidden"),), "plain file name"),
        ((("file", b"x", None),), "needs a filename"),
        ((("samples", b"x", "a.npz"), ("samples", b"y", "b.npz")), "twice"),
        ((("file", b"x", "labels.txt"), ("file", b"y", "labels.txt")), "twice"),
    ],
)
def test_bad_extra_fields(tmp_path: Path, parts: tuple, match: str) -> None:
    body = _form(("model", _model(), "m.onnx"), *parts)
    staged = StagedUpload(tmp_path, "m", max_bytes=1 << 20)
    with pytest.raises(InvalidInput, match=match):
        asyncio.run(form_receiver(f"multipart/form-data; boundary={BOUNDARY}", _chunks(body, 7), 1000)(staged))
    staged.discard()
    assert not staging_entries(tmp_path)
