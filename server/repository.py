"""The on-disk model repository in Triton's layout: ``<root>/<model>/<version>/model.onnx``.

Every path handed out is resolved and checked to stay under the root; names come from a strict pattern,
so no API field can point the server at an arbitrary file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from server.errors import InvalidInput, LoadFailed, ModelNotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
        """Every folder under the root that is a valid model name."""
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
        model_dir = self.model_dir(name)
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)

    def version_dir(self, name: str, version: int) -> Path:
        """The folder of one version."""
        return self._inside(self.model_dir(name) / str(version))

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidInput(f"path {path.name!r} resolves outside the model repository")
        return resolved


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
