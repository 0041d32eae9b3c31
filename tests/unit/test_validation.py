"""server.protocol.validation: request tensors against the model's specs; every message names the input or field."""

from __future__ import annotations

import numpy as np
import pytest

from server.errors import InvalidInput
from server.protocol import datatypes
from server.protocol.inference import InferenceRequest, InputTensor, RequestedOutput
from server.protocol.validation import TensorSpec, check_requested_outputs, prepare_inputs

FP32 = datatypes.BY_NAME["FP32"]
INT64 = datatypes.BY_NAME["INT64"]
BYTES = datatypes.BY_NAME["BYTES"]

SPECS = [TensorSpec("a", FP32, (3,)), TensorSpec("seq", INT64, (-1, 2))]
OUTPUTS = [TensorSpec("sum", FP32, (3,)), TensorSpec("prod", FP32, (3,)), TensorSpec("text", BYTES, (1,))]


def _tensor(name: str, shape: tuple[int, ...], dtype: datatypes.DataType = FP32) -> InputTensor:
    return InputTensor(name, dtype, np.zeros(shape, dtype=dtype.numpy))


def _request(*inputs: InputTensor, outputs: list[str] | None = None) -> InferenceRequest:
    return InferenceRequest("net", "", list(inputs), [RequestedOutput(n) for n in outputs or []])


def _valid(batch: int = 2, seq: int = 5) -> list[InputTensor]:
    return [_tensor("a", (batch, 3)), _tensor("seq", (batch, seq, 2), INT64)]


def test_valid_batched_request() -> None:
    prepared = prepare_inputs(_request(*_valid(batch=4)), SPECS, max_batch_size=8)
    assert prepared.samples == 4
    assert set(prepared.tensors) == {"a", "seq"}
    assert prepared.tensors["a"].shape == (4, 3)


def test_input_order_does_not_matter() -> None:
    a, seq = _valid()
    assert prepare_inputs(_request(seq, a), SPECS, 8).key == prepare_inputs(_request(a, seq), SPECS, 8).key


def test_batch_key_depends_on_non_batch_dims_only() -> None:
    key = prepare_inputs(_request(*_valid(batch=1, seq=5)), SPECS, 8).key
    assert prepare_inputs(_request(*_valid(batch=3, seq=5)), SPECS, 8).key == key
    assert prepare_inputs(_request(*_valid(batch=1, seq=6)), SPECS, 8).key != key
    hash(key)


def test_unbatched_model() -> None:
    specs = [TensorSpec("x", FP32, (2, 3))]
    prepared = prepare_inputs(_request(_tensor("x", (2, 3))), specs, max_batch_size=0)
    assert prepared.samples == 1
    assert prepared.key is None
    with pytest.raises(InvalidInput, match=r"input 'x': shape \[1, 2, 3\] has rank 3; the model expects \[2, 3\]"):
        prepare_inputs(_request(_tensor("x", (1, 2, 3))), specs, max_batch_size=0)
    with pytest.raises(InvalidInput, match=r"input 'x': dim 0 is 4, the model expects 2"):
        prepare_inputs(_request(_tensor("x", (4, 3))), specs, max_batch_size=0)


def test_unknown_input() -> None:
    with pytest.raises(InvalidInput) as info:
        prepare_inputs(_request(*_valid(), _tensor("bogus", (2, 3))), SPECS, 8)
    assert "'bogus'" in info.value.message
    assert "'net'" in info.value.message
    assert "['a', 'seq']" in info.value.message


def test_duplicate_input() -> None:
    with pytest.raises(InvalidInput, match=r"input 'a' is given more than once"):
        prepare_inputs(_request(*_valid(), _tensor("a", (2, 3))), SPECS, 8)


def test_missing_input() -> None:
    with pytest.raises(InvalidInput, match=r"model 'net' needs input\(s\) \['seq'\], which the request lacks"):
        prepare_inputs(_request(_tensor("a", (2, 3))), SPECS, 8)


def test_wrong_datatype() -> None:
    a, _ = _valid()
    with pytest.raises(InvalidInput, match=r"input 'seq': datatype FP32 does not match the model's INT64"):
        prepare_inputs(_request(a, _tensor("seq", (2, 5, 2), FP32)), SPECS, 8)


@pytest.mark.parametrize("shape", [(2,), (2, 3, 1), ()])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    _, seq = _valid()
    with pytest.raises(InvalidInput, match=r"input 'a': shape .* has rank \d; the model expects \[batch, 3\]"):
        prepare_inputs(_request(_tensor("a", shape), seq), SPECS, 8)


def test_wrong_fixed_dim() -> None:
    a, _ = _valid()
    with pytest.raises(InvalidInput, match=r"input 'seq': dim 2 is 3, the model expects 2"):
        prepare_inputs(_request(a, _tensor("seq", (2, 5, 3), INT64)), SPECS, 8)
    with pytest.raises(InvalidInput, match=r"input 'a': dim 1 is 4, the model expects 3"):
        prepare_inputs(_request(_tensor("a", (2, 4)), _valid()[1]), SPECS, 8)


def test_dynamic_dim_accepts_any_size() -> None:
    for seq in (0, 1, 1000):
        assert prepare_inputs(_request(*_valid(seq=seq)), SPECS, 8).samples == 2


@pytest.mark.parametrize("batch", [0, 9, 100])
def test_batch_size_outside_range(batch: int) -> None:
    with pytest.raises(InvalidInput, match=rf"input 'a': batch size {batch} is outside 1\.\.8 \(max_batch_size\)"):
        prepare_inputs(_request(*_valid(batch=batch)), SPECS, 8)


def test_batch_size_at_the_limit() -> None:
    assert prepare_inputs(_request(*_valid(batch=8)), SPECS, 8).samples == 8
    assert prepare_inputs(_request(*_valid(batch=1)), SPECS, 8).samples == 1


def test_inputs_disagreeing_on_batch_size() -> None:
    with pytest.raises(InvalidInput, match=r"inputs disagree on the batch size: \[2, 3\]"):
        prepare_inputs(_request(_tensor("a", (2, 3)), _tensor("seq", (3, 5, 2), INT64)), SPECS, 8)


def test_requested_outputs_default_to_all_in_model_order() -> None:
    assert check_requested_outputs(_request(*_valid()), OUTPUTS) == ["sum", "prod", "text"]


def test_requested_outputs_keep_the_client_order() -> None:
    assert check_requested_outputs(_request(*_valid(), outputs=["text", "sum"]), OUTPUTS) == ["text", "sum"]


def test_unknown_requested_output() -> None:
    with pytest.raises(InvalidInput) as info:
        check_requested_outputs(_request(*_valid(), outputs=["sum", "nope"]), OUTPUTS)
    message = info.value.message
    assert "requested output 'nope'" in message and "'net'" in message and "'prod'" in message
