"""Upload-time handling of framework models in a staged version folder: give the uploaded file its format's
name by content (the curl upload always stages ``model.onnx``), unpack a SavedModel tar strictly, and run the
checks that need no framework, so a refused file never reaches the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

from server.convert import formats
from server.convert.archive import extract_tar, saved_model_root
from server.convert.registry import detect
from server.errors import InvalidInput

ACCEPTED = "model.onnx, model.pt2, saved_model/ (files or saved_model.tar), model.json/model.ubj (XGBoost), model.txt"


def adopt_sources(folder_dir: Path, filename: str, label: str) -> None:
    """Rename an uploaded framework model (staged under the ONNX name) to its format's name, and extract an
    uploaded ``saved_model.tar`` into ``saved_model/`` (the tar is then dropped)."""
    for name in dict.fromkeys((filename, "model.onnx")):
        staged = folder_dir / name
        target = formats.sniff_source(staged) if staged.is_file() else None
        if target is not None:
            if (folder_dir / target).exists():
                raise InvalidInput(f"{label}: {name} is a {target} but {target} is uploaded too")
            staged.rename(folder_dir / target)
            break
    tar = folder_dir / formats.SAVED_MODEL_TAR
    if tar.is_file():
        if (folder_dir / formats.SAVED_MODEL_DIR).exists():
            raise InvalidInput(f"{label}: send saved_model/ files or saved_model.tar, not both")
        unpacked = folder_dir / ".unpacked"
        extract_tar(tar, unpacked, f"{label}: {formats.SAVED_MODEL_TAR}")
        saved_model_root(unpacked).rename(folder_dir / formats.SAVED_MODEL_DIR)
        shutil.rmtree(unpacked, ignore_errors=True)
        tar.unlink()


def check_sources(folder_dir: Path, filename: str, label: str) -> bool:
    """True when the folder holds a framework model (checked, and nothing else beside it); False when it
    holds none, so the ONNX checks apply."""
    converter = detect(folder_dir, filename)
    if converter is None:
        return False
    source = converter.source(folder_dir)
    assert source is not None
    converter.precheck(source, f"{label}: {source.name}")
    others = sorted(p.name for p in folder_dir.iterdir() if p != source)
    if others:
        raise InvalidInput(f"{label}: files {others} are not part of the {converter.framework} model {source.name}")
    return True
