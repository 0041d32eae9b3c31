"""The label files of a model's outputs (Triton's ``label_filename``), read once when a version loads, for
the classification extension (server/protocol/classification.py).

The file lies in the model's folder, next to the config, as in Triton: one label per line, line ``i`` is class
``i``. The config check already allows only a plain file name; the file must also resolve inside the
repository's model folders (server/repository/layout.py), so a link cannot point the server elsewhere."""

from __future__ import annotations

from pathlib import Path

from server.errors import LoadFailed
from server.repository.config import ModelConfig
from server.repository.layout import Repository

MAX_LABEL_BYTES = 16 * 1024 * 1024
"""The largest label file read (ImageNet's 1000 labels take about 20 KB)."""


def load_labels(config: ModelConfig, model_dir: Path, repository: Repository) -> dict[str, tuple[bytes, ...]]:
    """Each output with a ``label_filename``: its labels, by output name."""
    labels: dict[str, tuple[bytes, ...]] = {}
    for index, output in enumerate(config.output):
        if output.label_filename:
            where = f"output[{index}].label_filename"
            labels[output.name] = read_labels(model_dir / output.label_filename, repository, where)
    return labels


def read_labels(path: Path, repository: Repository, where: str) -> tuple[bytes, ...]:
    """One label per line, as Triton reads them (a last line without a newline counts; a ``\\r`` before the
    newline is dropped)."""
    resolved = repository.contained(path, f"{where} {path.name!r}")
    if not resolved.is_file():
        raise LoadFailed(f"{where}: {path.name!r} is not a file in the model folder")
    with open(resolved, "rb") as file:
        data = file.read(MAX_LABEL_BYTES + 1)
    if len(data) > MAX_LABEL_BYTES:
        raise LoadFailed(f"{where}: {path.name!r} is larger than {MAX_LABEL_BYTES} bytes")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return tuple(line.removesuffix(b"\r") for line in lines)
