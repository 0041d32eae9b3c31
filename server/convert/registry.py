"""Which converter a version folder needs, from the names of its files: ``model.pt2`` (PyTorch),
``saved_model/`` or ``saved_model.tar`` (TensorFlow), ``model.json``/``model.ubj`` (XGBoost), ``model.txt``
(LightGBM). A folder with ``model.onnx`` needs none. Static checks that need no framework live here too, so
the server can run them at upload without the optional extras."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from server.convert import formats
from server.convert.pt2 import check_pt2
from server.errors import InvalidInput

_HEADS = {
    formats.XGBOOST_JSON_FILE: formats.XGBOOST_JSON_FILE,
    formats.XGBOOST_UBJ_FILE: formats.XGBOOST_UBJ_FILE,
    formats.LIGHTGBM_FILE: formats.LIGHTGBM_FILE,
}


@dataclass(frozen=True)
class Converter:
    """One framework's converter: the extra that installs it, the modules it imports, and the names in a
    version folder that select it (the first one present is the source)."""

    framework: str
    extra: str
    modules: tuple[str, ...]
    names: tuple[str, ...]

    def source(self, version_dir: Path) -> Path | None:
        """The uploaded file or folder to convert, if this converter applies."""
        for name in self.names:
            path = version_dir / name
            if name == formats.SAVED_MODEL_DIR and (path / "saved_model.pb").is_file() and not path.is_symlink():
                return path
            if name != formats.SAVED_MODEL_DIR and path.is_file() and not path.is_symlink():
                return path
        return None

    def missing_modules(self) -> list[str]:
        """Modules of this converter that are not installed (looked up, not imported)."""
        return [module for module in self.modules if importlib.util.find_spec(module) is None]

    def missing_message(self) -> str:
        """What to install, naming the extra."""
        return (
            f"converting {self.framework} models needs {', '.join(self.missing_modules()) or 'its libraries'}: "
            f"install optiserve[{self.extra}]"
        )

    def library_versions(self) -> dict[str, str]:
        """Installed versions of the converter's distributions (part of the cache key)."""
        return {module: _version(module) for module in self.modules}

    def precheck(self, source: Path, label: str) -> None:
        """Checks that need no framework: the archive layout of a .pt2, the leading bytes of tree files."""
        if source.is_file():
            formats.refuse_pickles(source, label)
        if self.framework == "torch":
            check_pt2(source, label)
        elif source.name in _HEADS and formats.sniff_source(source) != source.name:
            raise InvalidInput(f"{label}: {source.name} does not look like a {self.framework} model file")


_DISTRIBUTIONS = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "xgboost": ("xgboost", "xgboost-cpu")}


def _version(module: str) -> str:
    for distribution in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "missing"


CONVERTERS = (
    Converter("torch", "torch", ("torch", "onnxscript"), (formats.PT2_FILE,)),
    Converter(
        "tensorflow", "tensorflow", ("tensorflow", "tf2onnx"), (formats.SAVED_MODEL_DIR, formats.SAVED_MODEL_TAR)
    ),
    Converter("xgboost", "sklearn", ("xgboost", "onnxmltools"), (formats.XGBOOST_JSON_FILE, formats.XGBOOST_UBJ_FILE)),
    Converter("lightgbm", "sklearn", ("lightgbm", "onnxmltools"), (formats.LIGHTGBM_FILE,)),
)


def detect(version_dir: Path, model_filename: str = "model.onnx") -> Converter | None:
    """The converter a version folder needs; None when it holds the ONNX model itself or nothing we know."""
    if (version_dir / model_filename).is_file():
        return None
    return next((c for c in CONVERTERS if c.source(version_dir) is not None), None)


def is_convertible(version_dir: Path) -> bool:
    """Whether :func:`server.convert.convert_version` applies to this folder."""
    return detect(version_dir) is not None
