"""The on-disk model repository in Triton's layout: ``<root>/<model>/<version>/model.onnx``.

Every path handed out is resolved and checked to stay under the root; names come from a strict pattern,
so no API field can point the server at an arbitrary file.

Links: a model folder, a version folder, or any file or folder inside a version folder (the model file,
external data, a SavedModel's files, samples.npz) may be a symbolic link, as long as it resolves inside a
model folder of this repository: sharing a file between versions or models is fine, reading one from
elsewhere (``/etc``, a home folder) or from the hidden ``.staging`` folder is not. Containment is checked
before existence, so the reply for a link out is the same whether its target exists or not. Config files
are stricter (see :func:`server.config.read_config`: inside their own model folder), and so is external
data (inside its version folder, :mod:`server.modelfile`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from server.errors import InvalidInput, LoadFailed, ModelNotFound
from server.protocol.numbers import parse_positive

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FLEET_FOLDER = ".optiserve"
"""The servers' own folder in the repository (replica heartbeats): hidden, like ``.staging``, so never a model."""
MAX_VERSION_ENTRIES = 10_000
"""Files and folders a version folder may hold (a SavedModel has a handful); checked at every load."""


def check_model_name(name: str) -> str:
    """Refuse names that could escape the repository or collide with our own folders."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidInput(f"model name {name!r} must match {NAME_PATTERN.pattern}")
    return name


class Repository:
    """Read access to the model folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def model_names(self) -> list[str]:
        """Every folder under the root that is a valid model name (hidden folders such as ``.staging`` and
        ``.optiserve`` never are: a name starts with a letter or digit)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))

    def model_dir(self, name: str) -> Path:
        """The model's folder; 404 when it does not exist."""
        path = self._inside(self.root / check_model_name(name))
        if not path.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return path

    def versions(self, name: str) -> list[int]:
        """Numeric version folders of a model, ascending."""
        return sorted(version_folders(self.model_dir(name)))

    def fingerprint(self, name: str) -> tuple[Any, ...] | None:
        """A cheap summary of what a load of this model reads, for polling: the name, inode, size and mtime of
        the model folder's entries (config, labels, version folders), of each version folder's entries and of
        ``warmup/``'s. Publishing (a rename) or removing anything a load reads changes it; file contents are
        never read. None when the model folder is gone."""
        try:
            model_dir = self.model_dir(name)
        except (ModelNotFound, InvalidInput):
            return None
        parts: list[tuple[Any, ...]] = []
        try:
            for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
                parts.append(_stat_key(entry, ""))
                if entry.is_dir() and (entry.name.isdigit() or entry.name == "warmup"):
                    try:
                        for inner in sorted(os.scandir(entry.path), key=lambda e: e.name):
                            parts.append(_stat_key(inner, entry.name))
                    except OSError as exc:  # removed while we looked: the next poll sees the result
                        parts.append((entry.name, "error", exc.errno))
        except OSError:  # the model folder went away while we looked
            return None
        return tuple(parts)

    def version_dir(self, name: str, version: int) -> Path:
        """The folder of one version."""
        return self._inside(self.model_dir(name) / str(version))

    def check_tree(self, folder: Path, label: str) -> None:
        """Every file and folder under ``folder`` (following links) must resolve inside a model folder of
        the repository; called before a load reads anything of a version. Only resolves (lstat/readlink),
        never opens a file."""
        seen: set[Path] = set()
        pending = [self._inside(folder, label)]
        entries = 0
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            with os.scandir(current) as listing:
                for entry in listing:
                    entries += 1
                    if entries > MAX_VERSION_ENTRIES:
                        raise LoadFailed(f"{label}: more than {MAX_VERSION_ENTRIES} files in the version folder")
                    resolved = self._inside(Path(entry.path), f"{label}: {entry.name}")
                    if resolved.is_dir():
                        pending.append(resolved)

    def contained(self, path: Path, what: str = "") -> Path:
        """The resolved path of a file a model's config names (a label file): 400 unless it lies inside a
        model folder of the repository. Only resolves, never opens."""
        return self._inside(path, what)

    def _inside(self, path: Path, what: str = "") -> Path:
        """The resolved path, which must lie inside a model folder (never the root itself, nor a hidden
        folder such as .staging)."""
        what = what or f"path {path.name!r}"
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            raise InvalidInput(f"{what}: the link cannot be resolved") from None
        if not resolved.is_relative_to(self.root):
            raise InvalidInput(f"{what} resolves outside the model repository")
        parts = resolved.relative_to(self.root).parts
        if not parts or not NAME_PATTERN.fullmatch(parts[0]):
            raise InvalidInput(f"{what} resolves outside the model folders of the repository")
        return resolved


def _stat_key(entry: os.DirEntry[str], folder: str) -> tuple[Any, ...]:
    try:
        info = entry.stat()  # follows links: a relinked file counts as a change
    except OSError:  # a dangling link
        info = entry.stat(follow_symlinks=False)
    return (folder, entry.name, info.st_ino, info.st_size, info.st_mtime_ns)


def version_folders(model_dir: Path) -> set[int]:
    """The version numbers of a model folder's numeric sub-folders (ASCII digits, no leading zero)."""
    if not model_dir.is_dir():
        return set()
    versions: set[int] = set()
    for path in model_dir.iterdir():
        try:
            number = parse_positive(path.name, "version folder")
        except InvalidInput:
            continue
        if path.is_dir():
            versions.add(number)
    return versions


def select_versions(policy: Any, available: list[int]) -> list[int]:
    """Apply a Triton ``version_policy`` (latest N by default, all, or specific) to the versions on disk."""
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(available)
    if kind == "specific":
        wanted = sorted(set(int(v) for v in policy.specific.versions))
        missing = [v for v in wanted if v not in available]
        if missing:
            raise LoadFailed(f"version_policy.specific names versions {missing} that are not in the repository")
        return wanted
    latest = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return available[-latest:]
