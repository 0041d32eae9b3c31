"""The validation set: user samples (.npz beside the model, keys = input names) or seeded random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizers import OptimizeError
from optimizers.modelinfo import analyze
from optimizers.reference import build_reference, find_samples, resize_batch
from tests.models import fixtures
from tests.unit.optimizers import models


def test_random_inputs_follow_the_metadata_and_are_seeded(tmp_path: Path) -> None:
    info = analyze(models.save(fixtures.int64_model(), tmp_path))
    first = build_reference(info, None, 20, batch_dim=True)
    second = build_reference(info, None, 20, batch_dim=True)
    assert first.source == "random" and first.count == 20
    assert [len(b["ids"]) for b in first.batches] == [8, 8, 4]
    assert first.batches[0]["ids"].dtype == np.int64 and first.batches[0]["ids"].shape == (8, 5)
    np.testing.assert_array_equal(first.batches[0]["ids"], second.batches[0]["ids"])
    assert first.digest == second.digest
    assert "weak check" in first.summary()["note"]  # type: ignore[operator]


def test_dynamic_dims_and_no_batch(tmp_path: Path) -> None:
    seq = analyze(models.save(fixtures.dynamic_seq(), tmp_path / "seq"))
    assert build_reference(seq, None, 4, batch_dim=True).batches[0]["tokens"].shape == (4, 8)
    fixed = analyze(models.save(fixtures.no_batch(), tmp_path / "fixed"))
    reference = build_reference(fixed, None, 32, batch_dim=False)
    assert all(b["x"].shape == (2, 3) for b in reference.batches)


def test_samples_beside_the_model_win(tmp_path: Path) -> None:
    path = models.save(fixtures.float_mlp(), tmp_path)
    x = np.arange(20 * 8, dtype=np.float64).reshape(20, 8)
    np.savez(tmp_path / "samples.npz", x=x)
    samples = find_samples(path, None)
    assert samples == tmp_path / "samples.npz"
    reference = build_reference(analyze(path), samples, 32, batch_dim=True)
    assert reference.source == "samples" and reference.count == 20
    assert reference.batches[0]["x"].dtype == np.float32  # cast to what the model takes
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in reference.batches]), x.astype(np.float32))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((4, 8), np.float32)}, "missing"),
        ({"x": np.zeros((0, 8), np.float32)}, "non-zero"),
        ({"x": np.array(["a"] * 8).reshape(1, 8)}, "the model wants"),
    ],
)
def test_bad_samples_say_what_is_wrong(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = models.save(fixtures.float_mlp(), tmp_path)
    np.savez(tmp_path / "s.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(OptimizeError, match=message):
        build_reference(analyze(path), tmp_path / "s.npz", 8, batch_dim=True)


def test_pickles_are_refused(tmp_path: Path) -> None:
    path = models.save(fixtures.float_mlp(), tmp_path)
    np.savez(tmp_path / "s.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(OptimizeError, match="readable"):
        build_reference(analyze(path), tmp_path / "s.npz", 8, batch_dim=True)
    with pytest.raises(OptimizeError, match="does not exist"):
        find_samples(path, tmp_path / "nope.npz")


def test_resize_batch() -> None:
    feed = {"x": np.arange(3)}
    np.testing.assert_array_equal(resize_batch(feed, 7)["x"], [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(resize_batch(feed, 2)["x"], [0, 1])
