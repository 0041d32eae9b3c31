"""The ``optimize`` extension block is cut out of Triton configs (pbtxt, YAML, JSON) and read as a dict."""

from __future__ import annotations

import pytest

from server.errors import LoadFailed
from server.repository.config import parse_config

PBTXT = """
name: "m"  # optimize { precision: fp16 } in a comment is ignored
max_batch_size: 8
parameters { key: "note" value { string_value: "optimize { not this }" } }
optimize {
  precision: int8
  prune { sparsity: 0.5, pattern: "2:4" }
  accuracy { cosine: 0.98 top1: 0.95 }
  time_budget_s: 2
}
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


def test_pbtxt_block_is_extracted_and_the_rest_parses() -> None:
    loaded = parse_config(PBTXT, "pbtxt")
    assert loaded.optimize == {
        "precision": "int8",
        "prune": {"sparsity": 0.5, "pattern": "2:4"},
        "accuracy": {"cosine": 0.98, "top1": 0.95},
        "time_budget_s": 2,
    }
    assert loaded.config.max_batch_size == 8
    assert loaded.config.parameters["note"].string_value == "optimize { not this }"
    assert loaded.config.dynamic_batching.max_queue_delay_microseconds == 100
    assert "optimize" not in loaded.explicit


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("optimize:\n  precision: fp32\nmax_batch_size: 4\n", "yaml"),
        ('{"optimize": {"precision": "fp32"}, "max_batch_size": 4}', "json"),
    ],
)
def test_yaml_and_json_blocks(text: str, fmt: str) -> None:
    loaded = parse_config(text, fmt)
    assert loaded.optimize == {"precision": "fp32"}
    assert loaded.config.max_batch_size == 4


def test_no_block_means_none_and_bad_blocks_fail_clearly() -> None:
    assert parse_config("max_batch_size: 2", "pbtxt").optimize is None
    with pytest.raises(LoadFailed, match="not closed"):
        parse_config("optimize { precision: int8 ", "pbtxt")
    with pytest.raises(LoadFailed, match="optimize must be a mapping"):
        parse_config('{"optimize": "int8"}', "json")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_precision_block_reaches_the_optimizer(precision: str) -> None:
    from optimizers import OptimizeOptions

    loaded = parse_config(f"max_batch_size: 4\noptimize {{ precision: {precision} }}\n", "pbtxt")
    assert loaded.optimize == {"precision": precision}
    assert OptimizeOptions.from_config_dict(loaded.optimize).precision == precision


def test_an_unknown_precision_names_the_field_and_the_choices() -> None:
    from server.repository.optimize_block import check_block

    with pytest.raises(LoadFailed, match=r"optimize\.precision: .*'bf16'.*\(got 'bf8'\)"):
        check_block({"precision": "bf8"})
