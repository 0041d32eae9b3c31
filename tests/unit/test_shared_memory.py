"""The system shared-memory registry and both codecs' use of it: key checks, bounds, duplicates, limits,
unregistering, reading inputs from and writing outputs to a region."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput
from server.http import codec as http_codec
from server.protocol import datatypes, tensors
from server.protocol.inference import InferenceResponse, OutputTensor
from server.protocol.shared_memory import SharedMemoryRef, SharedMemoryRegistry
from server.rpc import codec as grpc_codec

LIMITS = tensors.Limits(1 << 20, 8, 16)
SIZE = 4096


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "seg").write_bytes(bytes(SIZE))
    return tmp_path


@pytest.fixture
def regions(root: Path) -> Iterator[SharedMemoryRegistry]:
    registry = SharedMemoryRegistry(enabled=True, max_regions=2, root=root)
    yield registry
    registry.close()


def test_disabled_registry_refuses_and_says_how_to_enable(root: Path) -> None:
    with pytest.raises(InvalidInput, match="--allow-client-shm"):
        SharedMemoryRegistry(enabled=False, root=root).register("r", "/seg", 0, 16)


@pytest.mark.parametrize(
    "key", ["seg", "/", "/..", "/.", "/a/b", "/../etc/passwd", "//seg", "/seg\x00", "/se g", 7, None, "/" + "a" * 201]
)
def test_bad_keys_are_refused_naming_the_key(regions: SharedMemoryRegistry, key: object) -> None:
    with pytest.raises(InvalidInput, match="key"):
        regions.register("r", key, 0, 16)


def test_missing_segment_and_symlink_are_refused(regions: SharedMemoryRegistry, root: Path) -> None:
    with pytest.raises(InvalidInput, match="key: cannot open"):
        regions.register("r", "/nope", 0, 16)
    os.symlink(root / "seg", root / "link")
    with pytest.raises(InvalidInput, match="key: cannot open"):
        regions.register("r", "/link", 0, 16)


@pytest.mark.parametrize(("offset", "size", "match"), [(0, SIZE + 1, "byte_size"), (SIZE, 1, "byte_size"),
                                                       (-1, 16, "offset"), (0, 0, "byte_size"), (0, "8", "byte_size"),
                                                       (True, 8, "offset")])  # fmt: skip
def test_window_must_fit_the_segment(regions: SharedMemoryRegistry, offset: object, size: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        regions.register("r", "/seg", offset, size)
    assert regions.status() == []


def test_names_unique_count_limited_and_status(regions: SharedMemoryRegistry) -> None:
    regions.register("a", "/seg", 16, 64)
    with pytest.raises(InvalidInput, match="already registered"):
        regions.register("a", "/seg", 0, 16)
    regions.register("b", "/seg", 0, SIZE)
    with pytest.raises(InvalidInput, match="limit"):
        regions.register("c", "/seg", 0, 16)
    assert regions.status("a") == [{"name": "a", "key": "/seg", "offset": 16, "byte_size": 64}]
    assert [r["name"] for r in regions.status()] == ["a", "b"]
    with pytest.raises(InvalidInput, match="not registered"):
        regions.status("c")


def test_unregister_one_all_and_unknown(regions: SharedMemoryRegistry, root: Path) -> None:
    regions.register("a", "/seg", 0, 16)
    regions.register("b", "/seg", 0, 16)
    regions.unregister("nope")  # Triton: a no-op
    regions.unregister("a")
    assert [r["name"] for r in regions.status()] == ["b"]
    regions.unregister()
    assert regions.status() == []
    assert (root / "seg").exists()  # never unlinked: the segment is the client's
    regions.register("a", "/seg", 0, 16)  # the name is free again


def test_read_and_write_within_the_registered_window(regions: SharedMemoryRegistry, root: Path) -> None:
    regions.register("r", "/seg", 100, 64)
    regions.write(SharedMemoryRef("r", 8, 16), b"\x01" * 12, "output 'y'")
    data = (root / "seg").read_bytes()
    assert data[108:120] == b"\x01" * 12 and data[120:124] == bytes(4) and data[:108] == bytes(108)
    assert regions.read(SharedMemoryRef("r", 8, 4), "input 'x'") == b"\x01" * 4
    with pytest.raises(InvalidInput, match=r"input 'x'.*runs past the 64 bytes"):
        regions.read(SharedMemoryRef("r", 60, 8), "input 'x'")
    with pytest.raises(InvalidInput, match="more than its shared_memory_byte_size"):
        regions.write(SharedMemoryRef("r", 0, 4), b"12345", "output 'y'")
    with pytest.raises(InvalidInput, match="input 'x': shared_memory_region: shared memory region 'q'"):
        regions.read(SharedMemoryRef("q", 0, 4), "input 'x'")


def test_real_dev_shm_segment_from_tritonclient_stays_after_unregister() -> None:
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    handle = shm.create_shared_memory_region("optiserve_unit", f"/optiserve_unit_{os.getpid()}", 64)
    try:
        shm.set_shared_memory_region(handle, [np.arange(4, dtype=np.float32)])
        registry = SharedMemoryRegistry(enabled=True)
        registry.register("u", f"/optiserve_unit_{os.getpid()}", 0, 64)
        assert np.frombuffer(registry.read(SharedMemoryRef("u", 0, 16), "x"), np.float32).tolist() == [0, 1, 2, 3]
        registry.close()
        assert os.path.exists(f"/dev/shm/optiserve_unit_{os.getpid()}")
    finally:
        shm.destroy_shared_memory_region(handle)


# --- codecs ------------------------------------------------------------------------------------------------------


def _fill(regions: SharedMemoryRegistry, root: Path) -> None:
    with open(root / "seg", "r+b") as f:
        f.write(np.arange(6, dtype=np.float32).tobytes())
    regions.register("in", "/seg", 0, 24)
    regions.register("out", "/seg", 1024, 64)


def test_http_input_from_and_output_to_shared_memory(regions: SharedMemoryRegistry, root: Path) -> None:
    _fill(regions, root)
    shm_in = {"shared_memory_region": "in", "shared_memory_byte_size": 24}
    shm_out = {"shared_memory_region": "out", "shared_memory_byte_size": 56, "shared_memory_offset": 8}
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": shm_in}],
        "outputs": [{"name": "y", "parameters": shm_out}, {"name": "z"}],
    }
    request = http_codec.decode_request(orjson.dumps(body), None, "m", "", LIMITS, regions)
    assert request.inputs[0].array.tolist() == [[0, 1, 2], [3, 4, 5]]
    fp32 = datatypes.by_name("FP32")
    y = OutputTensor("y", fp32, np.full((2, 2), 7, np.float32))
    z = OutputTensor("z", fp32, np.ones(1, np.float32))
    encoded, header = http_codec.encode_response(InferenceResponse("m", "1", [y, z]), request, regions)
    assert header is None
    outputs = orjson.loads(encoded)["outputs"]
    assert outputs[0] == {"name": "y", "datatype": "FP32", "shape": [2, 2]}  # as Triton: no data, no parameters
    assert outputs[1]["data"] == [1.0]
    assert np.frombuffer((root / "seg").read_bytes()[1032:1048], np.float32).tolist() == [7] * 4


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"shared_memory_region": "in", "shared_memory_byte_size": 20}, "not a multiple|elements"),
        ({"shared_memory_region": "in", "shared_memory_byte_size": 24, "shared_memory_offset": 4}, "runs past"),
        ({"shared_memory_region": "nope", "shared_memory_byte_size": 24}, "not registered"),
        ({"shared_memory_region": "in"}, "shared_memory_byte_size is required"),
        ({"shared_memory_byte_size": 24}, "without shared_memory_region"),
        ({"shared_memory_region": "in", "shared_memory_byte_size": -1}, "non-negative"),
    ],
)
def test_http_bad_shared_memory_inputs_are_400s_naming_the_field(
    regions: SharedMemoryRegistry, root: Path, params: dict[str, object], match: str
) -> None:
    _fill(regions, root)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": params}]}
    with pytest.raises(InvalidInput, match=f"input 'x'.*({match})"):
        http_codec.decode_request(orjson.dumps(body), None, "m", "", LIMITS, regions)


def test_http_output_window_is_checked_at_decode(regions: SharedMemoryRegistry, root: Path) -> None:
    _fill(regions, root)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "outputs": [{"name": "y", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 65}}],
    }
    with pytest.raises(InvalidInput, match=r"output 'y'.*runs past the 64 bytes"):
        http_codec.decode_request(orjson.dumps(body), None, "m", "", LIMITS, regions)


def test_grpc_shared_memory_input_leaves_raw_contents_to_the_others(regions: SharedMemoryRegistry, root: Path) -> None:
    _fill(regions, root)
    message = pb.ModelInferRequest(model_name="m")
    shared = message.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    shared.parameters["shared_memory_region"].string_param = "in"
    shared.parameters["shared_memory_byte_size"].int64_param = 24
    message.inputs.add(name="w", datatype="INT32", shape=[1])
    message.raw_input_contents.append(np.array([9], np.int32).tobytes())
    first = message.outputs.add(name="y")
    first.parameters["shared_memory_region"].string_param = "out"
    first.parameters["shared_memory_byte_size"].int64_param = 64
    message.outputs.add(name="z")
    request = grpc_codec.decode_request(message, LIMITS, regions)
    assert request.inputs[0].array.tolist() == [[0, 1, 2], [3, 4, 5]] and request.inputs[1].array.tolist() == [9]
    fp32 = datatypes.by_name("FP32")
    y = OutputTensor("y", fp32, np.full(3, 5, np.float32))
    z = OutputTensor("z", fp32, np.ones(2, np.float32))
    reply = grpc_codec.encode_response(InferenceResponse("m", "1", [y, z]), request, regions)
    assert [o.name for o in reply.outputs] == ["y", "z"] and reply.raw_output_contents[0] == b""  # pairs by index
    assert np.frombuffer(reply.raw_output_contents[1], np.float32).tolist() == [1, 1]
    assert reply.outputs[0].parameters["shared_memory_region"].string_param == "out"
    assert np.frombuffer((root / "seg").read_bytes()[1024:1036], np.float32).tolist() == [5] * 3


def test_grpc_without_registry_refuses_shared_memory() -> None:
    message = pb.ModelInferRequest(model_name="m")
    shared = message.inputs.add(name="x", datatype="FP32", shape=[1])
    shared.parameters["shared_memory_region"].string_param = "in"
    shared.parameters["shared_memory_byte_size"].int64_param = 4
    with pytest.raises(InvalidInput, match="input 'x'"):
        grpc_codec.decode_request(message, LIMITS)
