"""OptimizeOptions: defaults, the optimize block of a model config, and errors that name the field."""

from __future__ import annotations

import pytest

from optimizers import OptimizeOptions, OptionsError, PruneOptions


def test_defaults() -> None:
    options = OptimizeOptions()
    assert (options.precision, options.target, options.prune, options.accuracy) == ("auto", "cpu", None, {})
    assert options.preferred_batch_size == 8


def test_from_config_dict_reads_the_block_and_server_values() -> None:
    block = {"precision": "int8", "prune": {"sparsity": "0.6"}, "accuracy": {"cosine": 0.98, "top1": 0.97}}
    options = OptimizeOptions.from_config_dict(block, target="cpu", max_batch_size=16, preferred_batch_sizes=[4])
    assert options.precision == "int8"
    assert options.prune == PruneOptions(sparsity=0.6, pattern="unstructured")
    assert options.accuracy == {"cosine": 0.98, "top1": 0.97}
    assert options.preferred_batch_size == 4
    assert OptimizeOptions.from_config_dict(None) == OptimizeOptions()


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"precision": "int4"}, "optimize.precision"),
        ({"prune": {"sparsity": 1.5}}, "optimize.prune.sparsity"),
        ({"prune": {"pattern": "4:8"}}, "optimize.prune.pattern"),
        ({"prune": {"sparsity": 0.3, "pattern": "2:4"}}, "optimize.prune"),
        ({"prune": {"amount": 0.5}}, "optimize.prune.amount"),
        ({"accuracy": {"psnr": 30}}, "optimize.accuracy.psnr"),
        ({"accuracy": {"cosine": 1.5}}, "optimize.accuracy"),
        ({"accuracy": {"rel_l2": "lots"}}, "optimize.accuracy.rel_l2"),
        ({"speed": "max"}, "optimize.speed"),
        ({"samples_path": "/etc/passwd"}, "optimize.samples_path"),  # no paths from an uploaded config
    ],
)
def test_errors_name_the_field(block: dict[str, object], field: str) -> None:
    with pytest.raises(OptionsError) as caught:
        OptimizeOptions.from_config_dict(block)
    assert str(caught.value).startswith(field + ":") or f"; {field}:" in str(caught.value), str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_preferred_batch_size() -> None:
    assert OptimizeOptions(max_batch_size=0).preferred_batch_size == 1
    assert OptimizeOptions(max_batch_size=4).preferred_batch_size == 4
    assert OptimizeOptions(max_batch_size=64, preferred_batch_sizes=[8, 32, 128]).preferred_batch_size == 32


def test_cache_dict_leaves_out_the_samples_path() -> None:
    options = OptimizeOptions(samples_path="x.npz")  # type: ignore[arg-type]
    assert "samples_path" not in options.cache_dict()
