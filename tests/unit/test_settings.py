"""server.settings: path settings are absolute from the start, against the folder the server started in,
whether they come from the defaults, a flag or the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings


def test_default_paths_are_absolute_in_the_start_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTISERVE_CACHE_DIR", raising=False)
    monkeypatch.delenv("OPTISERVE_MODEL_REPOSITORY", raising=False)
    settings = Settings()
    assert settings.model_repository == tmp_path / "model_repo"
    assert settings.cache_dir == tmp_path / ".optiserve-cache"
    assert not settings.model_fields_set  # the defaults stay defaults


def test_given_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTISERVE_CACHE_DIR", "cache/../c")
    settings = Settings(model_repository=Path("models"))
    assert settings.model_repository == tmp_path / "models"
    assert settings.cache_dir == tmp_path / "c"
    assert settings.model_repository.is_absolute() and settings.cache_dir.is_absolute()


def test_home_is_expanded_and_absolute_paths_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = Settings(model_repository=tmp_path / "repo", cache_dir=Path("~/cache"))
    assert settings.model_repository == tmp_path / "repo"
    assert settings.cache_dir == tmp_path / "home" / "cache"


def test_every_path_field_is_covered() -> None:
    """A new Path setting is made absolute too (the validator applies to every field)."""
    paths = [name for name, field in Settings.model_fields.items() if "Path" in str(field.annotation)]
    assert {"model_repository", "cache_dir"} <= set(paths)
    settings = Settings(**{name: Path("rel") for name in paths})
    assert all(getattr(settings, name).is_absolute() for name in paths)
