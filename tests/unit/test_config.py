"""server.repository.config (parse, auto-complete, JSON form) and server.repository.layout (versions, model
names)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import onnx
import orjson
import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from server.errors import InvalidInput, LoadFailed, ModelNotFound
from server.repository import config as cfg
from server.repository.layout import Repository, check_model_name, select_versions
from tests.models import fixtures

DEFAULT_MBS = 16


@functools.cache
def _model(name: str) -> onnx.ModelProto:
    return fixtures.ALL[name]()


def _complete(text: str, model: str, fmt: str = "pbtxt", name: str = "m") -> Any:
    return cfg.complete_config(cfg.parse_config(text, fmt), name, _model(model), DEFAULT_MBS)


def _tensors(group: Any) -> list[tuple[str, str, list[int]]]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in group]


# --- parsing ---------------------------------------------------------------------------------------------------

PBTXT = """
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "x", data_type: TYPE_FP32, dims: [ 8 ] }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters { key: "k" value { string_value: "v" } }
"""

YAML = """
name: mlp
platform: onnxruntime_onnx
max_batch_size: 8
input:
  - {name: x, data_type: TYPE_FP32, dims: [8]}
output:
  - name: y
    data_type: TYPE_FP32
    dims: [4]
dynamic_batching:
  max_queue_delay_microseconds: 100
instance_group:
  - count: 2
    kind: KIND_CPU
parameters:
  k: {string_value: v}
"""

JSON = json.dumps(
    {
        "name": "mlp",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [8]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 100},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "parameters": {"k": {"string_value": "v"}},
    }
)


def test_pbtxt_yaml_json_parse_to_the_same_config() -> None:
    parsed = {fmt: cfg.parse_config(text, fmt) for fmt, text in (("pbtxt", PBTXT), ("yaml", YAML), ("json", JSON))}
    parsed["yml"] = cfg.parse_config(YAML, "yml")
    first = parsed["pbtxt"].config
    assert first.name == "mlp" and first.max_batch_size == 8
    assert _tensors(first.input) == [("x", "TYPE_FP32", [8])]
    assert first.dynamic_batching.max_queue_delay_microseconds == 100
    assert first.instance_group[0].count == 2 and first.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert first.parameters["k"].string_value == "v"
    for fmt, loaded in parsed.items():
        assert loaded.config == first, fmt
        assert {"name", "max_batch_size", "input", "output", "dynamic_batching"} <= loaded.explicit, fmt


def test_empty_yaml_and_json_object_are_empty_configs() -> None:
    assert cfg.parse_config("", "yaml").config == mc.ModelConfig()
    assert cfg.parse_config("{}", "json").config == mc.ModelConfig()
    assert cfg.parse_config("", "pbtxt").explicit == set()


@pytest.mark.parametrize(
    ("text", "fmt", "problem"),
    [
        ('max_batch_size: "eight"', "pbtxt", "max_batch_size"),
        ("no_such_field: 1", "pbtxt", "no_such_field"),
        ('input [ { name: "x" data_type: TYPE_NOPE } ]', "pbtxt", "TYPE_NOPE"),
        ("max_batch_size: 8 {", "pbtxt", "config.pbtxt"),
        ("- a\n- b", "yaml", "top level must be a mapping"),
        ("max_batch_size: [1", "yaml", "config.yaml"),
        ("{bogus: 1}", "yaml", "bogus"),
        ('{"max_batch_size": "x"}', "json", "max_batch_size"),
        ("{", "json", "config.json"),
        ("[]", "json", "top level must be a mapping"),
        ('{"input": [{"name": "x", "dims": "8"}]}', "json", "dims"),
    ],
)
def test_bad_config_is_load_failed_naming_the_problem(text: str, fmt: str, problem: str) -> None:
    with pytest.raises(LoadFailed) as info:
        cfg.parse_config(text, fmt)
    assert problem in info.value.message
    assert info.value.message.startswith(f"config.{fmt}")


def test_read_config_from_folder(tmp_path: Path) -> None:
    assert cfg.read_config(tmp_path).config == mc.ModelConfig()
    (tmp_path / "config.yaml").write_text("max_batch_size: 3\n")
    assert cfg.read_config(tmp_path).config.max_batch_size == 3
    (tmp_path / "config.pbtxt").write_text("max_batch_size: 5\n")  # pbtxt wins over yaml
    loaded = cfg.read_config(tmp_path)
    assert loaded.config.max_batch_size == 5 and "max_batch_size" in loaded.explicit


# --- auto-complete ---------------------------------------------------------------------------------------------

AUTO = {
    "mlp": (DEFAULT_MBS, [("x", "TYPE_FP32", [8])], [("y", "TYPE_FP32", [4])]),
    "int64": (DEFAULT_MBS, [("ids", "TYPE_INT64", [5])], [("doubled", "TYPE_INT64", [5]), ("total", "TYPE_FP32", [1])]),
    "multi_io": (
        DEFAULT_MBS,
        [("a", "TYPE_FP32", [3]), ("b", "TYPE_FP32", [3])],
        [("sum", "TYPE_FP32", [3]), ("prod", "TYPE_FP32", [3])],
    ),
    "dynamic_seq": (
        DEFAULT_MBS,
        [("tokens", "TYPE_FP32", [-1])],
        [("scaled", "TYPE_FP32", [-1]), ("mean", "TYPE_FP32", [1])],
    ),
    "no_batch": (0, [("x", "TYPE_FP32", [2, 3])], [("y", "TYPE_FP32", [2, 3])]),
    "strings": (DEFAULT_MBS, [("text", "TYPE_STRING", [2])], [("echo", "TYPE_STRING", [2])]),
    "fp16": (DEFAULT_MBS, [("h", "TYPE_FP16", [4])], [("out", "TYPE_FP16", [4])]),
}


def test_every_fixture_has_an_expectation() -> None:
    assert set(AUTO) == set(fixtures.ALL)


@pytest.mark.parametrize("model", sorted(AUTO))
def test_auto_complete_from_graph(model: str) -> None:
    max_batch_size, inputs, outputs = AUTO[model]
    config = cfg.complete_config(cfg.LoadedConfig(mc.ModelConfig(), set()), model, _model(model), DEFAULT_MBS)
    assert config.name == model
    assert (config.platform, config.backend, config.default_model_filename) == (
        "onnxruntime_onnx",
        "onnxruntime",
        "model.onnx",
    )
    assert config.max_batch_size == max_batch_size
    assert _tensors(config.input) == inputs
    assert _tensors(config.output) == outputs
    assert config.HasField("dynamic_batching") == (max_batch_size > 0)
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    specs = cfg.tensor_specs(config, inputs=True)
    assert [(s.name, s.datatype.config_name, list(s.dims)) for s in specs] == inputs


def test_complete_does_not_modify_the_loaded_config() -> None:
    loaded = cfg.parse_config('input [ { name: "x" } ]', "pbtxt")
    before = loaded.config.SerializeToString()
    cfg.complete_config(loaded, "m", _model("mlp"), DEFAULT_MBS)
    assert loaded.config.SerializeToString() == before


def test_default_max_batch_size_zero_means_no_batching() -> None:
    config = cfg.complete_config(cfg.LoadedConfig(mc.ModelConfig(), set()), "m", _model("mlp"), 0)
    assert config.max_batch_size == 0
    assert _tensors(config.input) == [("x", "TYPE_FP32", [-1, 8])]
    assert not config.HasField("dynamic_batching")


@pytest.mark.parametrize("fmt", ["pbtxt", "yaml", "json"])
def test_explicit_max_batch_size_zero_is_respected(fmt: str) -> None:
    text = {"pbtxt": "max_batch_size: 0\n", "yaml": "max_batch_size: 0\n", "json": '{"max_batch_size": 0}'}[fmt]
    config = _complete(text, "mlp", fmt)
    assert config.max_batch_size == 0
    assert _tensors(config.input) == [("x", "TYPE_FP32", [-1, 8])]
    assert _tensors(config.output) == [("y", "TYPE_FP32", [-1, 4])]
    assert not config.HasField("dynamic_batching")


def test_explicit_max_batch_size_zero_not_first_on_its_line() -> None:
    config = _complete('name: "m" max_batch_size: 0', "mlp")
    assert config.max_batch_size == 0


def test_explicit_max_batch_size_without_dynamic_batching_does_not_batch() -> None:
    config = _complete("max_batch_size: 4", "mlp")
    assert config.max_batch_size == 4
    assert _tensors(config.input) == [("x", "TYPE_FP32", [8])]
    assert not config.HasField("dynamic_batching")


def test_explicit_dynamic_batching_keeps_default_max_batch_size() -> None:
    config = _complete("dynamic_batching { max_queue_delay_microseconds: 50 }", "mlp")
    assert config.max_batch_size == DEFAULT_MBS
    assert config.dynamic_batching.max_queue_delay_microseconds == 50


def test_partial_tensor_configs_are_completed() -> None:
    config = _complete('input [ { name: "x" } ]\noutput [ { name: "y", dims: [ 4 ] } ]', "mlp")
    assert _tensors(config.input) == [("x", "TYPE_FP32", [8])]
    assert _tensors(config.output) == [("y", "TYPE_FP32", [4])]


def test_config_may_list_a_subset_of_outputs() -> None:
    config = _complete('output [ { name: "total" } ]', "int64")
    assert _tensors(config.output) == [("total", "TYPE_FP32", [1])]


@pytest.mark.parametrize(
    ("text", "model", "problem"),
    [
        ('input [ { name: "nope" } ]', "mlp", r"input 'nope' in the config is not a input of the ONNX graph \['x'\]"),
        ('output [ { name: "z" } ]', "mlp", r"output 'z' in the config is not a output of the ONNX graph"),
        (
            'input [ { name: "x", data_type: TYPE_INT32 } ]',
            "mlp",
            r"input 'x': config data_type TYPE_INT32 does not match the model's TYPE_FP32",
        ),
        ('output [ { name: "echo", data_type: TYPE_FP32 } ]', "strings", r"TYPE_FP32 .* TYPE_STRING"),
        ('input [ { name: "x", dims: [ 8, 1 ] } ]', "mlp", r"input 'x': config dims \[8, 1\] have rank 2.*rank 1"),
        ('max_batch_size: 0\ninput [ { name: "x", dims: [ 8 ] } ]', "mlp", r"rank 1, the model expects rank 2"),
        ('name: "other"', "mlp", r"config name 'other' does not match the model folder 'm'"),
        ("max_batch_size: 4", "no_batch", r"first dimension is fixed at 2; set max_batch_size: 0"),
        ("max_batch_size: -1", "mlp", r"max_batch_size: -1 is outside 0..1048576"),
        ('platform: "tensorrt_plan"', "mlp", r"platform 'tensorrt_plan' is not supported"),
        ('backend: "pytorch"', "mlp", r"backend 'pytorch' is not supported"),
    ],
)
def test_config_disagreeing_with_the_graph_is_load_failed(text: str, model: str, problem: str) -> None:
    with pytest.raises(LoadFailed, match=problem):
        _complete(text, model)


def test_matching_name_platform_backend_accepted() -> None:
    config = _complete('name: "m" platform: "onnxruntime_onnx" backend: "onnxruntime"', "mlp")
    assert config.name == "m"


def test_config_missing_a_graph_input_is_load_failed_or_completed() -> None:
    try:
        config = _complete('input [ { name: "a" } ]', "multi_io")
    except LoadFailed as exc:
        assert "b" in exc.message
    else:
        assert [t.name for t in config.input] == ["a", "b"]


def test_config_dims_contradicting_fixed_graph_dims_is_load_failed() -> None:
    with pytest.raises(LoadFailed, match="ids"):
        _complete('input [ { name: "ids", dims: [ 8 ] } ]', "int64")


# --- config_to_json --------------------------------------------------------------------------------------------


def test_config_to_json_uses_numbers_and_enum_names() -> None:
    batching_text = (
        "dynamic_batching { max_queue_delay_microseconds: 100 priority_levels: 2 "
        "default_queue_policy { default_timeout_microseconds: 7 max_queue_size: 9 } "
        "priority_queue_policy { key: 2 value { default_timeout_microseconds: 11 } } }"
    )
    text = PBTXT.replace('name: "mlp"', "").replace(
        "dynamic_batching { max_queue_delay_microseconds: 100 }", batching_text
    )
    config = _complete(text, "mlp")
    data = cfg.config_to_json(config)
    assert data["name"] == "m"
    assert data["max_batch_size"] == 8
    assert data["input"][0]["dims"] == [8] and all(type(d) is int for d in data["input"][0]["dims"])
    assert data["input"][0]["data_type"] == "TYPE_FP32"
    assert data["output"][0] == {**data["output"][0], "name": "y", "data_type": "TYPE_FP32", "dims": [4]}
    batching = data["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 100
    assert type(batching["max_queue_delay_microseconds"]) is int
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 7
    assert batching["default_queue_policy"]["max_queue_size"] == 9
    assert batching["priority_queue_policy"]["2"]["default_timeout_microseconds"] == 11
    assert data["instance_group"][0]["kind"] == "KIND_CPU"
    assert data["instance_group"][0]["count"] == 2
    assert data["parameters"] == {"k": {"string_value": "v"}}
    assert data["platform"] == "onnxruntime_onnx"
    # fields left unset are still printed, with their defaults
    assert data["input"][0]["is_shape_tensor"] is False
    # it is plain JSON and reads back into the same message
    assert json_format.ParseDict(orjson.loads(orjson.dumps(data)), mc.ModelConfig()) == config


def test_config_to_json_no_int64_strings_anywhere() -> None:
    config = _complete("max_batch_size: 0", "dynamic_seq")
    data = cfg.config_to_json(config)
    assert data["input"][0]["dims"] == [-1, -1]

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")
        else:
            assert not (isinstance(value, str) and value.lstrip("-").isdigit()), f"{path} is the string {value!r}"

    walk(data, "config")


# --- repository ------------------------------------------------------------------------------------------------


def _policy(text: str) -> Any:
    policy = mc.ModelVersionPolicy()
    json_format.Parse(text, policy)
    return policy


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("{}", [3]),
        ('{"latest": {}}', [3]),
        ('{"latest": {"num_versions": 2}}', [2, 3]),
        ('{"latest": {"num_versions": 10}}', [1, 2, 3]),
        ('{"all": {}}', [1, 2, 3]),
        ('{"specific": {"versions": [3, 1, 3]}}', [1, 3]),
    ],
)
def test_select_versions(policy: str, expected: list[int]) -> None:
    assert select_versions(_policy(policy), [1, 2, 3]) == expected


def test_select_versions_with_nothing_on_disk() -> None:
    assert select_versions(_policy("{}"), []) == []
    assert select_versions(_policy('{"all": {}}'), []) == []


def test_select_specific_missing_version_is_load_failed() -> None:
    with pytest.raises(LoadFailed, match=r"version_policy.specific names versions \[4\]"):
        select_versions(_policy('{"specific": {"versions": [1, 4]}}'), [1, 2, 3])


def test_version_policy_from_a_config() -> None:
    config = cfg.parse_config("version_policy: { specific: { versions: [ 2 ] } }", "pbtxt").config
    assert select_versions(config.version_policy, [1, 2, 3]) == [2]


@pytest.mark.parametrize(
    "name", ["../etc", "a/b", "", ".", "..", "x" * 129, "a\\b", "-lead", ".hidden", "a b", "a\n", "\u00e9"]
)
def test_check_model_name_rejects(name: str) -> None:
    with pytest.raises(InvalidInput, match="model name"):
        check_model_name(name)


@pytest.mark.parametrize("name", ["resnet-50_v1.2", "a", "x" * 128, "0model", "M.v2"])
def test_check_model_name_accepts(name: str) -> None:
    assert check_model_name(name) == name


def test_repository_layout(tmp_path: Path) -> None:
    for version in ("1", "3", "10", "0", "latest"):
        (tmp_path / "mlp" / version).mkdir(parents=True)
    (tmp_path / "bad name").mkdir()
    (tmp_path / "file.txt").write_text("x")
    repo = Repository(tmp_path)
    assert repo.model_names() == ["mlp"]
    assert repo.versions("mlp") == [1, 3, 10]
    assert repo.version_dir("mlp", 3) == (tmp_path / "mlp" / "3").resolve()
    with pytest.raises(ModelNotFound, match="'other'"):
        repo.model_dir("other")
    with pytest.raises(InvalidInput):
        repo.model_dir("../mlp")


def test_repository_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "repo"
    root.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidInput, match="outside the model repository"):
        Repository(root).model_dir("escape")
