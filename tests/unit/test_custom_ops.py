"""Which models get onnxruntime-extensions' operators: the domains read from a file's opset_import without
parsing its graph, the library to register, the message naming the extra where it is missing, and the check of
the images handed to DecodeImage (onnxruntime-extensions 0.15 exits the process on a malformed JPEG)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizers import custom_ops
from server.backends import image_guard
from server.errors import InvalidInput
from tests.models import fixtures, pipelines


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_domains_are_read_from_the_file(tmp_path: Path) -> None:
    plain = save(fixtures.float_mlp(), tmp_path / "plain.onnx")
    image = save(pipelines.image_preprocess(), tmp_path / "image.onnx")
    text = save(pipelines.bert_tokenizer(), tmp_path / "text.onnx")
    for path in (plain, image, text):
        expected = {entry.domain for entry in onnx.load(str(path)).opset_import}
        assert custom_ops.opset_domains(path) == expected
    assert not custom_ops.uses_custom_ops(plain)
    assert custom_ops.uses_custom_ops(image) and custom_ops.uses_custom_ops(text)


def test_unreadable_files_have_no_domains(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    assert custom_ops.opset_domains(tmp_path / "empty.onnx") == frozenset()
    assert custom_ops.opset_domains(tmp_path / "junk.onnx") == frozenset()
    assert custom_ops.opset_domains(tmp_path / "missing.onnx") == frozenset()


def test_library_only_for_models_that_use_the_ops(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_extensions")
    assert custom_ops.library_for(save(fixtures.float_mlp(), tmp_path / "plain.onnx")) is None
    library = custom_ops.library_for(save(pipelines.bert_tokenizer(), tmp_path / "text.onnx"))
    assert library is not None and Path(library).is_file()


def test_missing_extensions_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import raises ImportError
    text = save(pipelines.bert_tokenizer(), tmp_path / "text.onnx")
    with pytest.raises(
        custom_ops.CustomOpsUnavailable, match=r"ai\.onnx\.contrib.*pip install optiserve\[extensions\]"
    ):
        custom_ops.library_for(text)
    assert custom_ops.library_for(save(fixtures.float_mlp(), tmp_path / "plain.onnx")) is None


def test_decode_image_inputs_are_found(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    image = save(pipelines.image_preprocess(), tmp_path / "image.onnx")
    assert image_guard.guarded_inputs(image, "m") == {"jpeg"}
    assert image_guard.guarded_inputs(save(pipelines.bert_tokenizer(), tmp_path / "t.onnx"), "m") == frozenset()


@pytest.mark.parametrize(
    "data",
    [b"\xff\xd8 not a JPEG", b"", b"GIF89a", b"\x89PNG\r\n\x1a\n garbage"],
    ids=["jpeg-marker-then-junk", "empty", "gif-header", "png-header-then-junk"],
)
def test_bad_images_are_refused_naming_the_input(data: bytes) -> None:
    pytest.importorskip("PIL")
    with pytest.raises(InvalidInput, match="input 'jpeg': not a complete JPEG or PNG image"):
        image_guard.check_images("jpeg", np.frombuffer(data, np.uint8))


def test_truncated_jpeg_is_refused_and_a_whole_one_passes() -> None:
    pytest.importorskip("PIL")
    jpeg = pipelines.jpeg_bytes(0)
    image_guard.check_images("jpeg", np.frombuffer(jpeg, np.uint8))
    with pytest.raises(InvalidInput, match="input 'jpeg'"):
        image_guard.check_images("jpeg", np.frombuffer(jpeg[: len(jpeg) // 2], np.uint8))
