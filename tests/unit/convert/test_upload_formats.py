"""Uploads of framework models (server.repository.upload + server.convert.staging): Triton file keys and the curl
form both accept model.pt2, XGBoost JSON/UBJ, LightGBM text and SavedModels (files or a tar), named by content;
pickles under any name are refused with 415, pointing to ``optiserve convert``, and never unpickled."""

from __future__ import annotations

import asyncio
import pickle
import zipfile
from pathlib import Path

import pytest

from server.errors import InvalidInput, UnsupportedMediaType
from server.http.multipart import form_receiver
from server.repository.upload import StagedUpload, files_receiver, parse_file_key
from tests.models import frameworks

BOUNDARY = "b0undary"


def _stage(root: Path, files: dict[str, bytes], config: str | None = None) -> StagedUpload:
    staged = StagedUpload(root, "m", max_bytes=50 * 1024 * 1024)
    asyncio.run(files_receiver(files, config)(staged))
    return staged


def _form_upload(root: Path, data: bytes, filename: str) -> StagedUpload:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"; filename="{filename}"\r\n\r\n'.encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )

    async def chunks():  # type: ignore[no-untyped-def]
        yield body

    staged = StagedUpload(root, "m", max_bytes=50 * 1024 * 1024)
    asyncio.run(form_receiver(f"multipart/form-data; boundary={BOUNDARY}", chunks(), 1 << 20)(staged))
    return staged


def _published(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root / "m")) for p in (root / "m").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def pt2_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    frameworks.save_pt2(path)
    return path.read_bytes()


def test_saved_model_file_keys(tmp_path: Path) -> None:
    assert parse_file_key("1/saved_model/variables/variables.index") == (1, "saved_model/variables/variables.index")
    for bad in ("1/saved_model/../x", "1/other/x", "1/saved_model/.x", "1/saved_model/a/b/c/d/e/f/g/h/i"):
        with pytest.raises(InvalidInput):
            parse_file_key(bad)
    files = {"1/saved_model/saved_model.pb": b"pb", "1/saved_model/variables/variables.index": b"ix"}
    staged = _stage(tmp_path, files)
    staged.validate(32)
    staged.publish_now()
    assert _published(tmp_path) == ["1/saved_model/saved_model.pb", "1/saved_model/variables/variables.index"]


def test_saved_model_tar_is_extracted_both_ways(tmp_path: Path) -> None:
    source = tmp_path / "src" / "saved_model"
    (source / "variables").mkdir(parents=True)
    (source / "saved_model.pb").write_bytes(b"pb")
    (source / "variables" / "variables.index").write_bytes(b"ix")
    tar = frameworks.tar_folder(source)
    staged = _stage(tmp_path / "a", {"1/saved_model.tar": tar})
    staged.validate(32)
    staged.publish_now()
    assert _published(tmp_path / "a") == ["1/saved_model/saved_model.pb", "1/saved_model/variables/variables.index"]
    staged = _form_upload(tmp_path / "b", tar, "saved_model.tar")
    staged.validate(32)
    staged.publish_now()
    assert _published(tmp_path / "b") == ["1/saved_model/saved_model.pb", "1/saved_model/variables/variables.index"]


def test_pt2_by_key_by_content_and_by_form(tmp_path: Path, pt2_bytes: bytes) -> None:
    for index, files in enumerate(({"1/model.pt2": pt2_bytes}, {"1/model.onnx": pt2_bytes})):
        root = tmp_path / str(index)
        staged = _stage(root, files)
        staged.validate(32)
        staged.publish_now()
        assert _published(root) == ["1/model.pt2"]
    staged = _form_upload(tmp_path / "form", pt2_bytes, "cnn.pt2")
    staged.validate(32)
    staged.publish_now()
    assert _published(tmp_path / "form") == ["1/model.pt2"]


def test_tree_models_by_content(tmp_path: Path) -> None:
    booster = frameworks.xgboost_booster()
    booster.save_model(str(tmp_path / "b.ubj"))
    frameworks.lightgbm_booster().save_model(str(tmp_path / "l.txt"))
    for name, expected in (("b.ubj", "1/model.ubj"), ("l.txt", "1/model.txt")):
        root = tmp_path / f"repo-{name}"
        staged = _form_upload(root, (tmp_path / name).read_bytes(), name)
        staged.validate(32)
        staged.publish_now()
        assert _published(root) == [expected]


def test_a_pickled_pt2_payload_is_refused(tmp_path: Path, pt2_bytes: bytes) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(pt2_bytes)

    def pickled(config: dict) -> None:  # type: ignore[type-arg]
        next(iter(config["config"].values()))["use_pickle"] = True

    frameworks.rewrite_zip(path, frameworks.edit_json("data/weights/model_weights_config.json", pickled))
    staged = _stage(tmp_path / "r", {"1/model.pt2": path.read_bytes()})
    with pytest.raises(UnsupportedMediaType, match="optiserve convert"):
        staged.validate(32)


def _torchscript_like() -> bytes:
    path_bytes = __import__("io").BytesIO()
    with zipfile.ZipFile(path_bytes, "w") as archive:
        archive.writestr("m/data.pkl", b"\x80\x02")
        archive.writestr("m/constants.pkl", b"\x80\x02")
        archive.writestr("m/code/__torch__.py", b"")
    return path_bytes.getvalue()


@pytest.mark.parametrize("name", ["model.onnx", "model.pt2", "model.pt", "model.pkl", "model.joblib", "model.pth"])
def test_pickles_under_any_name_are_refused_and_never_loaded(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "marker"
    payload = frameworks.marker_pickle(marker)
    for files in ({f"1/{name}": payload}, {f"1/{name}": _torchscript_like()}):
        with pytest.raises(UnsupportedMediaType, match="optiserve convert"):
            staged = _stage(tmp_path / "t", files)
            staged.validate(32)
    if not name.endswith((".pt", ".pkl", ".joblib", ".pth")):
        with pytest.raises(UnsupportedMediaType, match="never unpickles"):
            _form_upload(tmp_path / "f", payload, name).validate(32)
    assert not marker.exists()
    assert pickle.loads(payload) is not None and marker.exists()  # the control: unpickling it does create it


def test_other_files_beside_a_framework_model_are_refused(tmp_path: Path) -> None:
    source = b"tree\nversion=v4\n"
    staged = _stage(tmp_path, {"1/model.txt": source, "1/notes.txt": b"x"})
    with pytest.raises(InvalidInput, match="not part of the lightgbm model"):
        staged.validate(32)
