"""Which framework format an uploaded file is, by its content, without importing any framework.

Only formats that are data (or, for PyTorch and TensorFlow, data we check before any framework reads it) are
accepted; pickle-based ones (scikit-learn and joblib pickles, ``torch.save`` checkpoints, TorchScript, Keras
files with their Python configs) are refused with a pointer to the offline converter, which runs on the user's
machine where loading their own pickle is their call.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from server.errors import UnsupportedMediaType

#: Names a converted format has inside a version folder (the upload is renamed to these).
PT2_FILE = "model.pt2"
XGBOOST_JSON_FILE = "model.json"
XGBOOST_UBJ_FILE = "model.ubj"
LIGHTGBM_FILE = "model.txt"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_TAR = "saved_model.tar"
SOURCE_FILES = (PT2_FILE, XGBOOST_JSON_FILE, XGBOOST_UBJ_FILE, LIGHTGBM_FILE, SAVED_MODEL_TAR)

CONVERT_HINT = (
    "convert it on your own machine with `optiserve convert MODEL -o model.onnx` (it prints the same accuracy "
    "comparison) and upload the ONNX file"
)
_ZIP = b"PK\x03\x04"
_HEAD = 512


def pickle_refusal(label: str, what: str = "a Python pickle") -> UnsupportedMediaType:
    """The 415 for any pickle-based upload: the server never unpickles an upload."""
    return UnsupportedMediaType(f"{label} is {what}; the server never unpickles an upload: {CONVERT_HINT}")


def sniff_source(path: Path) -> str | None:
    """The version-folder name an uploaded file should have, by content: ``model.pt2``, ``model.json``,
    ``model.ubj``, ``model.txt`` or ``saved_model.tar``; None for anything else (ONNX, or unknown)."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD)
    if head.startswith(_ZIP):
        return PT2_FILE if zip_kind(path) == "pt2" else None
    if head.startswith(b"{L") and b"learner" in head[:32]:
        return XGBOOST_UBJ_FILE
    if head.lstrip().startswith(b'{"learner"'):
        return XGBOOST_JSON_FILE
    if head.startswith(b"tree\nversion=v"):
        return LIGHTGBM_FILE
    if len(head) >= 262 and head[257:262] == b"ustar":
        return SAVED_MODEL_TAR
    return None


def zip_kind(path: Path) -> str:
    """``pt2`` (a torch.export archive), ``torchscript``, ``torch-checkpoint``, ``keras`` or ``zip``, from the
    member names only (nothing inside is read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "zip"
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in tails and any(t.startswith("models/") for t in tails):
        return "pt2"
    if "constants.pkl" in tails or "code/" in {t[:5] for t in tails}:
        return "torchscript"
    if "data.pkl" in tails:
        return "torch-checkpoint"
    if "config.json" in tails and any(t.endswith(".weights.h5") for t in tails):
        return "keras"
    return "zip"


def refuse_pickles(path: Path, label: str) -> None:
    """415 for a pickle (by its protocol header) or a zip that carries pickles, whatever its name."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise pickle_refusal(label)
    if head == _ZIP[:2]:
        refuse_pickle_zip(path, label)


def refuse_pickle_zip(path: Path, label: str) -> None:
    """415 for zips that carry pickles (TorchScript, ``torch.save``) or Python configs (Keras)."""
    kind = zip_kind(path)
    if kind == "torchscript":
        raise pickle_refusal(label, "a TorchScript archive (its constants and code are pickles)")
    if kind == "torch-checkpoint":
        raise pickle_refusal(label, "a torch.save checkpoint (a pickle in a zip)")
    if kind == "keras":
        raise pickle_refusal(label, "a Keras file (its config can name Python code to run)")
