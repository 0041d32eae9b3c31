"""Files outside the repository are never read for a model: the model file, external data, framework
sources and anything else in a version folder must resolve inside a model folder of the repository (a link
within it is fine), the check comes before any existence check (no oracle), and version numbers are read
with the one strict ASCII rule."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from server.errors import InvalidInput, LoadFailed, ServerError
from server.models.loader import VersionLoader
from server.repository.layout import Repository
from server.repository.modelfile import check_external_data
from server.repository.upload import StagedUpload, _numeric_folders
from server.settings import Settings
from tests.models import fixtures


def _repo(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root, version folder of model m, a folder outside the root holding a valid model and a secret)."""
    root = tmp_path / "repo"
    version_dir = fixtures.write_model(root, "m", fixtures.float_mlp())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    onnx.save(fixtures.float_mlp(seed=3), str(outside / "evil.onnx"))
    (outside / "secret.txt").write_text("secret")
    return root, version_dir, outside


@pytest.mark.parametrize("name", ["model.onnx", "weights.bin", "samples.npz", "model.pt2", "saved_model"])
def test_any_link_out_of_a_version_folder_is_refused(tmp_path: Path, name: str) -> None:
    root, version_dir, outside = _repo(tmp_path)
    link = version_dir / name
    link.unlink(missing_ok=True)
    link.symlink_to(outside / "evil.onnx" if name != "saved_model" else outside)
    with pytest.raises(InvalidInput, match=re.escape(f"{name} resolves outside the model repository")):
        Repository(root).check_tree(version_dir, "model 'm' version 1")


def test_links_out_are_refused_alike_whether_the_target_exists(tmp_path: Path) -> None:
    root, version_dir, outside = _repo(tmp_path)
    messages = []
    for target in (outside / "evil.onnx", outside / "no-such-file", Path("/etc/passwd"), Path("/no/such/dir/x")):
        (version_dir / "model.onnx").unlink()
        (version_dir / "model.onnx").symlink_to(target)
        with pytest.raises(InvalidInput) as info:
            Repository(root).check_tree(version_dir, "v1")
        messages.append(info.value.message)
    assert len(set(messages)) == 1


def test_links_are_followed_into_linked_folders(tmp_path: Path) -> None:
    """A folder linked inside the repository is walked too: a link out hidden one level down is found."""
    root, version_dir, outside = _repo(tmp_path)
    shared = root / "shared_assets"
    shared.mkdir()
    (shared / "nested").mkdir()
    (shared / "nested" / "leak").symlink_to(outside / "secret.txt")
    (version_dir / "assets").symlink_to(shared)
    with pytest.raises(InvalidInput, match="leak resolves outside"):
        Repository(root).check_tree(version_dir, "v1")


def test_links_inside_the_repository_are_fine(tmp_path: Path) -> None:
    root, version_dir, _ = _repo(tmp_path)
    other = fixtures.write_model(root, "other", fixtures.float_mlp(seed=5))
    (version_dir / "model.onnx").unlink()
    (version_dir / "model.onnx").symlink_to(other / "model.onnx")  # share a file with another model
    (version_dir / "up").symlink_to(root / "m")  # a cycle: walked once
    Repository(root).check_tree(version_dir, "v1")


@pytest.mark.parametrize("target", [".staging", "."])
def test_links_into_hidden_folders_or_the_root_are_refused(tmp_path: Path, target: str) -> None:
    root, version_dir, _ = _repo(tmp_path)
    (root / ".staging").mkdir()
    (version_dir / "peek").symlink_to(root / target)
    with pytest.raises(InvalidInput, match="outside the model folders"):
        Repository(root).check_tree(version_dir, "v1")
    (root / "alias").symlink_to(root / target)
    with pytest.raises(InvalidInput):
        Repository(root).model_dir("alias")


def test_link_loops_are_refused_not_crashed_on(tmp_path: Path) -> None:
    root, version_dir, _ = _repo(tmp_path)
    (version_dir / "loop").symlink_to(version_dir / "loop")
    with pytest.raises(InvalidInput, match="cannot be resolved"):
        Repository(root).check_tree(version_dir, "v1")
    model = onnx.load(str(version_dir / "model.onnx"))
    onnx.external_data_helper.convert_model_to_external_data(model, location="loop", size_threshold=0)
    with pytest.raises(InvalidInput, match="cannot be resolved"):
        check_external_data(model, version_dir, "v1")


def test_the_loader_refuses_a_model_file_linking_out(tmp_path: Path) -> None:
    root, version_dir, outside = _repo(tmp_path)
    (version_dir / "model.onnx").unlink()
    (version_dir / "model.onnx").symlink_to(outside / "evil.onnx")
    repository = Repository(root)
    loader = VersionLoader(repository, Settings(model_repository=root, default_precision="none"), None)
    from server.repository.config import read_config

    with pytest.raises(ServerError, match=r"model\.onnx resolves outside the model repository"):
        loader.build("m", 1, read_config(repository.model_dir("m")), lambda step: None)


def test_the_loader_takes_only_plain_model_file_names(tmp_path: Path) -> None:
    """A LoadedConfig built in code (not parsed) still cannot name a path."""
    root, _, _ = _repo(tmp_path)
    repository = Repository(root)
    loader = VersionLoader(repository, Settings(model_repository=root, default_precision="none"), None)
    from server.repository.config import LoadedConfig, ModelConfig

    config = ModelConfig(default_model_filename="../../elsewhere/evil.onnx")
    with pytest.raises(InvalidInput, match="default_model_filename"):
        loader.build("m", 1, LoadedConfig(config, set()), lambda step: None)


def test_version_folders_are_strict_ascii(tmp_path: Path) -> None:
    for name in ("1", "12", "01", "0", "\u00b2", "\uff13", "1_0", "latest"):
        (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / "m" / "7").write_text("a file, not a version folder")
    assert Repository(tmp_path).versions("m") == [1, 12]
    assert _numeric_folders(tmp_path / "m") == {1, 7, 12}  # a file named 7 takes the number too


def test_missing_model_file_reason_names_the_plain_file(tmp_path: Path) -> None:
    root, version_dir, _ = _repo(tmp_path)
    (version_dir / "model.onnx").unlink()
    repository = Repository(root)
    loader = VersionLoader(repository, Settings(model_repository=root, default_precision="none"), None)
    from server.repository.config import parse_config

    with pytest.raises(LoadFailed, match=r"net\.onnx is missing"):
        loader.build("m", 1, parse_config('default_model_filename: "net.onnx"', "pbtxt"), lambda step: None)


def test_an_upload_never_reads_the_config_of_a_model_folder_linking_out(tmp_path: Path) -> None:
    root, _, outside = _repo(tmp_path)
    (outside / "config.pbtxt").write_text("secret_token_in_a_file_outside: 1")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    staged = StagedUpload(root, "linked", max_bytes=1 << 20)
    staged.add_file("1/model.onnx", fixtures.float_mlp().SerializeToString())
    with pytest.raises(InvalidInput, match="outside the model repository") as info:
        staged.validate(32)
    assert "secret" not in info.value.message
    staged.discard()
