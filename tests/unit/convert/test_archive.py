"""server.convert.archive and .formats: strict tar extraction (nothing outside, no links, caps), zip
listing, and telling formats apart by content."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from server.convert import formats
from server.convert.archive import check_zip, extract_tar
from server.errors import InvalidInput, PayloadTooLarge


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_a_saved_model_tar_is_extracted(tmp_path: Path) -> None:
    folder = tarfile.TarInfo("saved_model")
    folder.type = tarfile.DIRTYPE
    members = [
        (folder, None),
        _file("saved_model/saved_model.pb", b"graph"),
        _file("saved_model/variables/variables.index", b"index"),
        _file("./saved_model/variables/variables.data-00000-of-00001", b"data"),
    ]
    dest = tmp_path / "out"
    extract_tar(_tar(tmp_path / "a.tar", members), dest, "upload")
    assert (dest / "saved_model" / "saved_model.pb").read_bytes() == b"graph"
    assert (dest / "saved_model" / "variables" / "variables.data-00000-of-00001").read_bytes() == b"data"


@pytest.mark.parametrize(
    "member",
    [
        _file("/etc/evil"),
        _file("../evil"),
        _file("saved_model/../../evil"),
        _file("saved_model/.hidden"),
        _file("saved_model/a\\b"),
        _special("saved_model/link", tarfile.SYMTYPE, "/etc/passwd"),
        _special("saved_model/hard", tarfile.LNKTYPE, "saved_model/saved_model.pb"),
        _special("saved_model/dev", tarfile.CHRTYPE),
        _special("saved_model/fifo", tarfile.FIFOTYPE),
    ],
)
def test_hostile_members_are_refused_and_nothing_is_left(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]) -> None:
    path = _tar(tmp_path / "a.tar", [_file("saved_model/saved_model.pb"), member])
    with pytest.raises(InvalidInput):
        extract_tar(path, tmp_path / "out", "upload")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil").exists()


def test_duplicates_and_caps(tmp_path: Path) -> None:
    twice = _tar(tmp_path / "twice.tar", [_file("a/b"), _file("a/b")])
    with pytest.raises(InvalidInput, match="twice"):
        extract_tar(twice, tmp_path / "o1", "upload")
    big = _tar(tmp_path / "big.tar", [_file("a/b", b"x" * 5000)])
    with pytest.raises(PayloadTooLarge):
        extract_tar(big, tmp_path / "o2", "upload", max_unpacked=1000)
    assert not (tmp_path / "o2").exists()


def test_huge_extended_headers_and_compressed_tars_are_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("a/b")
    info.pax_headers = {"comment": "x" * 100_000}
    pax = _tar(tmp_path / "pax.tar", [(info, b"x")])
    with pytest.raises(InvalidInput, match="extended header"):
        extract_tar(pax, tmp_path / "o1", "upload")
    gz = tmp_path / "a.tar.gz"
    with tarfile.open(gz, "w:gz") as archive:
        data = b"x"
        member = tarfile.TarInfo("a/b")
        member.size = 1
        archive.addfile(member, io.BytesIO(data))
    with pytest.raises(InvalidInput, match="uncompressed"):
        extract_tar(gz, tmp_path / "o2", "upload")


def test_zip_listing_refuses_escapes_and_bombs(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        archive.writestr("root/.data/version", "1")
    assert check_zip(good, "z") == ["root/.data/version"]
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("../evil", "1")
    with pytest.raises(InvalidInput):
        check_zip(bad, "z")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("root/a", b"\0" * 2_000_000)
    with pytest.raises(PayloadTooLarge):
        check_zip(bomb, "z", max_unpacked=1_000_000)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"learner":{"attributes":{}}}', formats.XGBOOST_JSON_FILE),
        (b"{L\x00\x00\x00\x00\x00\x00\x00\x07learner{", formats.XGBOOST_UBJ_FILE),
        (b"tree\nversion=v4\nnum_class=1\n", formats.LIGHTGBM_FILE),
        (b"\x08\x09\x12\x04onnx", None),
        (b"\x80\x04\x95", None),
    ],
)
def test_sniff_source(tmp_path: Path, head: bytes, expected: str | None) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(head)
    assert formats.sniff_source(path) == expected


def test_zip_kinds(tmp_path: Path) -> None:
    cases = {
        "torchscript": ["m/data.pkl", "m/constants.pkl", "m/code/__torch__.py"],
        "torch-checkpoint": ["m/data.pkl", "m/data/0"],
        "keras": ["config.json", "model.weights.h5", "metadata.json"],
        "pt2": ["m/archive_format", "m/models/model.json"],
        "zip": ["readme.txt"],
    }
    for kind, names in cases.items():
        path = tmp_path / f"{kind}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for name in names:
                archive.writestr(name, b"x")
        assert formats.zip_kind(path) == kind
