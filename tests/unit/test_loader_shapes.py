"""What the loader tells the optimizer about input shapes: only what the user said (config dims or warmup)."""

from __future__ import annotations

from server.models.loader import _config_shapes
from server.repository.config import parse_config

EXPLICIT = """
max_batch_size: 4
input [ { name: "x", data_type: TYPE_FP32, dims: [ 3, -1, -1 ] } ]
"""

WARMUP = (
    EXPLICIT
    + """
model_warmup [ { name: "w", batch_size: 1, inputs { key: "x" value: { data_type: TYPE_FP32, dims: [ 3, 64, 96 ],
  zero_data: true } } } ]
"""
)


def test_config_dims_the_user_wrote_reach_the_optimizer() -> None:
    loaded = parse_config(EXPLICIT, "pbtxt")
    assert _config_shapes(loaded.config, explicit_inputs="input" in loaded.explicit) == {"x": [3, -1, -1]}


def test_a_warmup_shape_is_preferred_as_one_the_user_says_runs() -> None:
    loaded = parse_config(WARMUP, "pbtxt")
    assert _config_shapes(loaded.config, explicit_inputs=True) == {"x": [3, 64, 96]}


def test_auto_completed_dims_add_nothing() -> None:
    loaded = parse_config(EXPLICIT, "pbtxt")
    assert _config_shapes(loaded.config, explicit_inputs=False) == {}
