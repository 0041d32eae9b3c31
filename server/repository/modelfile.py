"""Checks on one model version's files before any runtime reads them: the model file must be ONNX (never
a pickle; framework formats are checked in :mod:`server.convert`), and every tensor kept in external data
must point at a regular file inside the version folder.

The external-data check only resolves paths (lstat/readlink/stat); it never opens the files it checks, so
a model cannot make the server read ``/etc/passwd`` or follow a symlink out of the repository. The model file
itself, and everything else in a version folder, is contained by :meth:`server.repository.Repository.check_tree`
before a load reads it; every config field that names a file takes a plain name (:func:`check_file_name`,
applied by :func:`server.config.check_config`), so a config cannot name a path either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from server.convert.formats import CONVERT_HINT, pickle_refusal, refuse_pickle_zip
from server.errors import InvalidInput, UnsupportedMediaType
from server.protocol.numbers import parse_uint

PLAIN_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt", ".sav", ".dill", ".keras", ".h5")
_FOREIGN_MAGIC = {
    b"PK\x03\x04": "a zip archive but not a torch.export archive (model.pt2)",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file",
    b"\x93NUMPY": "a NumPy array file",
}


def check_file_name(name: str, what: str) -> str:
    """A plain file name (no folders, not hidden) that is not a pickle-based format by its suffix."""
    if not PLAIN_FILE_NAME.fullmatch(name):
        raise InvalidInput(f"{what} {name!r} must be a plain file name matching {PLAIN_FILE_NAME.pattern}")
    refuse_pickle_name(name, what)
    return name


def refuse_pickle_name(name: str, what: str) -> None:
    """Refuse (415) a name with a pickle-based format's suffix (``.pkl``, ``.pt``, ``.joblib``, ...)."""
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise pickle_refusal(f"{what} {name!r}", "a pickle-based format by its name")


def sniff_format(path: Path, label: str) -> None:
    """Refuse (415) files whose first bytes say they are a pickle or another non-ONNX container."""
    with open(path, "rb") as file:
        head = file.read(8)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise pickle_refusal(label)
    if head.startswith(b"PK\x03\x04"):
        refuse_pickle_zip(path, label)
    for magic, what in _FOREIGN_MAGIC.items():
        if head.startswith(magic):
            raise UnsupportedMediaType(f"{label} is {what}, not a model format we accept; {CONVERT_HINT}")


def load_graph(path: Path, label: str) -> onnx.ModelProto:
    """Parse the model without touching its external data (400 when it is not ONNX)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidInput(f"{label} is not a valid ONNX model ({type(exc).__name__}: {exc})") from None


def check_graph(path: Path, label: str) -> None:
    """onnx.checker's full check (with strict shape inference) on the file, which also handles >2 GB
    models with external data; run only after :func:`check_external_data` passed."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise InvalidInput(f"{label} fails the ONNX checker: {exc}") from None


def check_external_data(model: onnx.ModelProto, version_dir: Path, label: str) -> set[str]:
    """Check every external-data location and return the top-level names of the files they use."""
    base = version_dir.resolve()
    used: set[str] = set()
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{label}: tensor {tensor.name!r}"
        target = _resolve_inside(location, base, where)
        _check_extent(info, target, where)
        used.add(PurePosixPath(location).parts[0])
    return used


def _resolve_inside(location: str, base: Path, where: str) -> Path:
    """The resolved file of a location that must stay inside ``base`` (no absolute path, no .., no symlink
    out). Resolving reads link targets but opens nothing."""
    relative = PurePosixPath(location)
    if (
        not location
        or "\\" in location
        or "\x00" in location
        or relative.is_absolute()
        or os.path.isabs(location)
        or ".." in relative.parts
    ):
        raise InvalidInput(f"{where}: external data location {location!r} must be a relative path inside its folder")
    try:
        target = (base / relative).resolve()
    except (OSError, RuntimeError):  # a link loop
        raise InvalidInput(f"{where}: external data location {location!r} cannot be resolved") from None
    if target == base or not target.is_relative_to(base):
        raise InvalidInput(f"{where}: external data location {location!r} resolves outside the model folder")
    if not target.is_file():
        raise InvalidInput(f"{where}: external data file {location!r} is missing")
    return target


def _check_extent(info: dict[str, str], target: Path, where: str) -> None:
    """offset and length, when given, must be non-negative integers in ASCII digits within the file (what
    ``int()`` alone would read from ``"1_0"`` or non-ASCII digits, a runtime may read differently)."""
    offset = parse_uint(info.get("offset", "0"), f"{where}: external data offset")
    length = parse_uint(info["length"], f"{where}: external data length") if "length" in info else None
    size = target.stat().st_size
    if (length is not None and offset + length > size) or offset > size:
        raise InvalidInput(f"{where}: external data offset/length lie outside the {size}-byte file")


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model can carry: initializers, sparse initializers and node attributes, in the main
    graph, in subgraphs (If/Loop/Scan bodies) and in model-local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse_tensors(sparse)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield from _sparse_tensors(attribute.sparse_tensor)
        for sparse in attribute.sparse_tensors:
            yield from _sparse_tensors(sparse)
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def _sparse_tensors(sparse: Any) -> Iterator[onnx.TensorProto]:
    yield sparse.values
    yield sparse.indices
