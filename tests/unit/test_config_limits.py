"""Hardening of model configs (server.repository.config.check_config, server.repository.optimize_block): every
field that names a file takes a plain file name, every number the server uses is range-checked with its
relations, and a bad value fails the parse naming the field, instead of a load that serves and then hangs or
fails requests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor
from tritonclient.grpc import model_config_pb2 as mc

from server.errors import InvalidInput, LoadFailed, ServerError
from server.models.batching import BatchPolicy
from server.models.placement import instance_plan, thread_parameter
from server.repository import config as cfg
from server.settings import Settings
from tests.models import fixtures

FILE_FIELD = re.compile(r"(^|_)file(name)?s?$")  # input_data_file, label_filename, cc_model_filenames; not profile
BAD_NAMES = ["../../../elsewhere/evil.onnx", "/etc/passwd", "sub/model.onnx", ".hidden", "..", "a\\b", ""]


def _parse(data: dict[str, Any]) -> cfg.LoadedConfig:
    return cfg.parse_config(json.dumps(data), "json")


# ---- files: every string field of Triton's schema that names a file ---------------------------------------------
def _file_fields(desc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every string field (or string map value) whose name says it holds a file name."""
    found: list[tuple[Any, ...]] = []
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            if value.message_type is not None:
                found += _file_fields(value.message_type, (*path, ("map", field.name)))
            elif FILE_FIELD.search(field.name) and value.type == descriptor.FieldDescriptor.TYPE_STRING:
                found.append((*path, ("map", field.name)))
        elif field.message_type is not None:
            if len(path) < 6:
                found += _file_fields(field.message_type, (*path, ("message", field.name, field.is_repeated)))
        elif FILE_FIELD.search(field.name) and field.type == descriptor.FieldDescriptor.TYPE_STRING:
            found.append((*path, ("string", field.name, field.is_repeated)))
    return found


def _json_with(path: tuple[Any, ...], value: str) -> dict[str, Any]:
    """The JSON config that sets the field at ``path`` to ``value`` (maps keyed "k", lists of one)."""
    step, rest = path[0], path[1:]
    if step[0] == "map":
        inner: Any = _json_with(rest, value) if rest else value
        return {step[1]: {"k": inner}}
    if step[0] == "message":
        inner = _json_with(rest, value)
        return {step[1]: [inner] if step[2] else inner}
    return {step[1]: [value] if step[2] else value}


FILE_FIELDS = _file_fields(mc.ModelConfig.DESCRIPTOR)


def test_the_schema_walk_finds_the_known_file_fields() -> None:
    names = {path[-1][1] for path in FILE_FIELDS}
    assert {
        "default_model_filename",
        "cc_model_filenames",
        "label_filename",
        "input_data_file",
        "data_file",
        "op_library_filename",
    } <= names


@pytest.mark.parametrize("path", FILE_FIELDS, ids=lambda p: ".".join(step[1] for step in p))
@pytest.mark.parametrize("name", BAD_NAMES[:4], ids=["traversal", "absolute", "folder", "hidden"])
def test_every_file_field_refuses_paths(path: tuple[Any, ...], name: str) -> None:
    with pytest.raises(ServerError) as info:
        _parse(_json_with(path, name))
    assert path[-1][1] in info.value.message, info.value.message


@pytest.mark.parametrize("path", FILE_FIELDS, ids=lambda p: ".".join(step[1] for step in p))
def test_file_fields_accept_plain_names_except_custom_op_libraries(path: tuple[Any, ...]) -> None:
    data = _json_with(path, "plain_name.bin")
    if path[0][1] == "model_warmup":  # a warmup input also needs its data type (check_warmup)
        data["model_warmup"][0]["inputs"]["k"]["data_type"] = "TYPE_FP32"
    if path[-1][1] == "op_library_filename":  # a shared object is code: never loaded, whatever its name
        with pytest.raises(InvalidInput, match="op_library_filename"):
            _parse(data)
    else:
        _parse(data)


@pytest.mark.parametrize("fmt", ["pbtxt", "json"])
@pytest.mark.parametrize("name", BAD_NAMES[:-1])
def test_default_model_filename_is_a_plain_name(fmt: str, name: str) -> None:
    text = (
        f"default_model_filename: {json.dumps(name)}"
        if fmt == "pbtxt"
        else json.dumps({"default_model_filename": name})
    )
    with pytest.raises(InvalidInput, match="default_model_filename"):
        cfg.parse_config(text, fmt)


def test_model_filename_defaults_and_refuses_pickles() -> None:
    assert cfg.model_filename(mc.ModelConfig()) == "model.onnx"
    assert cfg.model_filename(_parse({"default_model_filename": "net.onnx"}).config) == "net.onnx"
    with pytest.raises(ServerError, match="pickle"):
        _parse({"default_model_filename": "model.pkl"})


# ---- numbers: range, relations, strict digits ----------------------------------------------------------------------
BAD_VALUES = [
    ("max_batch_size: -1", "max_batch_size"),
    ("max_batch_size: 2000000", "max_batch_size"),
    ("instance_group [ { count: -3 } ]", "instance_group[0].count"),
    ("instance_group [ { count: 100000 } ]", "instance_group[0].count"),
    ("instance_group [ { count: 200 gpus: [ 0, 1 ] } ]", "instance_group"),
    ("instance_group [ { count: 1 }, { count: 1 gpus: [ -1 ] } ]", "instance_group[1].gpus"),
    ("input [ { name: 'x' dims: [ 0 ] } ]", "input[0].dims"),
    ("input [ { name: 'x' dims: [ -2 ] } ]", "input[0].dims"),
    ("output [ { name: 'y' dims: [ 4294967296 ] } ]", "output[0].dims"),
    ("input [ { name: 'x' dims: [ " + ", ".join(["1"] * 65) + " ] } ]", "input[0].dims"),
    ("input [ { name: 'x' }, { name: 'x' } ]", "input[1].name"),
    ("version_policy { specific { versions: [ 0 ] } }", "version_policy.specific.versions"),
    ("dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }", "max_queue_delay_microseconds"),
    ("dynamic_batching { max_queue_delay_microseconds: 3600000001 }", "max_queue_delay_microseconds"),
    ("dynamic_batching { priority_levels: 18446744073709551615 }", "priority_levels"),
    ("dynamic_batching { priority_levels: 1001 }", "priority_levels"),
    ("dynamic_batching { priority_levels: 2 default_priority_level: 3 }", "default_priority_level"),
    ("dynamic_batching { default_priority_level: 1 }", "default_priority_level"),
    (
        "dynamic_batching { priority_levels: 2 priority_queue_policy { key: 3 value { } } }",
        "priority_queue_policy key",
    ),
    ("dynamic_batching { priority_queue_policy { key: 1 value { } } }", "priority_queue_policy key"),
    (
        "dynamic_batching { default_queue_policy { default_timeout_microseconds: 9223372036854775807 } }",
        "default_queue_policy.default_timeout_microseconds",
    ),
    ("dynamic_batching { default_queue_policy { max_queue_size: 18446744073709551615 } }", "max_queue_size"),
    (
        "dynamic_batching { priority_levels: 2 priority_queue_policy { key: 1 value { max_queue_size: 10000000 } } }",
        "priority_queue_policy[1].max_queue_size",
    ),
    ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 16 ] }", "preferred_batch_size"),
    ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 0 ] }", "preferred_batch_size"),
    ("max_batch_size: 0 dynamic_batching { preferred_batch_size: [ 2 ] }", "preferred_batch_size"),
    (
        "max_batch_size: 8 optimization { cuda { graphs: true graph_spec [ { batch_size: 16 } ] } }",
        "graph_spec.batch_size",
    ),
    ("instance_group [ { kind: 7 } ]", "instance_group[0].kind"),
    ("input [ { name: 'x' data_type: 99 } ]", "input[0].data_type"),
    ("dynamic_batching { default_queue_policy { timeout_action: 5 } }", "timeout_action"),
    ("parameters { key: 'intra_op_thread_count' value { string_value: '0' } }", "intra_op_thread_count"),
    ("parameters { key: 'intra_op_thread_count' value { string_value: '4096' } }", "intra_op_thread_count"),
    ("parameters { key: 'inter_op_thread_count' value { string_value: '\u00b2' } }", "inter_op_thread_count"),
    ("parameters { key: 'inter_op_thread_count' value { string_value: '1_0' } }", "inter_op_thread_count"),
    ("parameters { key: 'inter_op_thread_count' value { string_value: ' 4' } }", "inter_op_thread_count"),
    ("optimize { time_budget_s: 1e999 }", "optimize"),
    ("optimize { accuracy { rel_l2: nan } }", "optimize.accuracy.rel_l2"),
    ("optimize { min_gain: 5 }", "optimize.min_gain"),
    ("optimize { samples_path: 'x.npz' }", "optimize.samples_path"),
    ("optimize { " + "a { " * 20 + "}" * 20 + " }", "optimize"),
]


@pytest.mark.parametrize(("text", "field"), BAD_VALUES)
def test_absurd_values_fail_the_parse_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(LoadFailed) as info:
        cfg.parse_config(text, "pbtxt")
    assert field in info.value.message, info.value.message


GOOD_VALUES = [
    f"max_batch_size: {cfg.MAX_BATCH_SIZE} dynamic_batching {{ preferred_batch_size: [ 1, {cfg.MAX_BATCH_SIZE} ] }}",
    "instance_group [ { count: 0 } ]",  # Triton's default: 1
    f"instance_group [ {{ count: {cfg.MAX_INSTANCES // 2} }}, {{ count: {cfg.MAX_INSTANCES // 2} }} ]",
    "input [ { name: 'x' dims: [ -1, 1, 2147483647 ] } ]",
    f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.MAX_MICROSECONDS} priority_levels: "
    f"{cfg.MAX_PRIORITY_LEVELS} default_priority_level: {cfg.MAX_PRIORITY_LEVELS} "
    f"priority_queue_policy {{ key: 1 value {{ max_queue_size: {cfg.MAX_QUEUE_SIZE} "
    f"default_timeout_microseconds: {cfg.MAX_MICROSECONDS} }} }} }}",
    "dynamic_batching { priority_levels: 3 }",  # default level 0: the middle one
    "parameters { key: 'intra_op_thread_count' value { string_value: '4' } }",
    "optimize { precision: fp16 accuracy { rel_l2: 0.01 } time_budget_s: 2.5 }",
]


@pytest.mark.parametrize("text", GOOD_VALUES)
def test_values_within_the_limits_parse(text: str) -> None:
    cfg.parse_config(text, "pbtxt")


def test_limits_are_what_the_batcher_can_take() -> None:
    """A config at every limit builds a batch policy without allocating per unit of a value."""
    loaded = cfg.parse_config(GOOD_VALUES[4], "pbtxt")
    policy = BatchPolicy.from_config(loaded.config, default_max_queue_size=8)
    assert policy.priority_levels == cfg.MAX_PRIORITY_LEVELS
    assert policy.max_queue_delay_ns == cfg.MAX_MICROSECONDS * 1000


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"max_batch_size": "\u0663"}, "max_batch_size"),  # Arabic-Indic three: int() reads it as 3
        ({"max_batch_size": "1_0"}, "max_batch_size"),
        ({"dynamic_batching": {"priority_levels": "\uff11"}}, "priority_levels"),  # fullwidth one
        ({"input": [{"name": "x", "dims": ["\u0038"]}]}, None),  # a plain ASCII "8" string is fine
        (
            {"dynamic_batching": {"priority_levels": 2, "priority_queue_policy": {"\u0661": {}}}},
            "priority_queue_policy",
        ),
    ],
)
def test_json_numbers_given_as_strings_must_be_ascii(data: dict[str, Any], field: str | None) -> None:
    if field is None:
        assert list(_parse(data).config.input[0].dims) == [8]
        return
    with pytest.raises(LoadFailed) as info:
        _parse(data)
    assert field in info.value.message and info.value.message.startswith("config.json")


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ('{"optimize": {"accuracy": {"rel_l2": NaN}}}', "json"),
        ('{"optimize": {"time_budget_s": Infinity}}', "json"),
        ("optimize:\n  accuracy:\n    cosine: .nan\n", "yaml"),
        ("[" * 100_000 + "]" * 100_000, "json"),
        ("a: " + "[" * 100_000 + "]" * 100_000, "yaml"),
    ],
)
def test_non_finite_numbers_and_deep_nesting_are_load_failed(text: str, fmt: str) -> None:
    with pytest.raises(LoadFailed):
        cfg.parse_config(text, fmt)


def test_optimize_block_numbers_are_ascii() -> None:
    loaded = cfg.parse_config("optimize { time_budget_s: 2 min_gain: .5 }", "pbtxt")
    assert loaded.optimize == {"time_budget_s": 2, "min_gain": 0.5}
    with pytest.raises(LoadFailed, match="time_budget_s"):
        cfg.parse_config("optimize { time_budget_s: \u0663 }", "pbtxt")  # a word, not a number: refused by type


# ---- relations to an auto-completed max_batch_size -----------------------------------------------------------------
def test_batch_sizes_are_checked_against_the_completed_max_batch_size() -> None:
    loaded = cfg.parse_config("dynamic_batching { preferred_batch_size: [ 64 ] }", "pbtxt")  # max_batch_size unset
    with pytest.raises(LoadFailed, match=r"preferred_batch_size: 64 is outside 1..max_batch_size \(16\)"):
        cfg.complete_config(loaded, "m", fixtures.float_mlp(), 16)
    assert cfg.complete_config(loaded, "m", fixtures.float_mlp(), 64).max_batch_size == 64


def test_completed_max_batch_size_is_bounded() -> None:
    with pytest.raises(LoadFailed, match="max_batch_size"):
        cfg.complete_config(cfg.parse_config("", "pbtxt"), "m", fixtures.float_mlp(), cfg.MAX_BATCH_SIZE + 1)


# ---- the loader's own guards (configs that did not come through parse_config) --------------------------------------
def test_instance_plan_refuses_negative_and_huge_counts() -> None:
    config = mc.ModelConfig()
    config.instance_group.add(count=-3, kind=mc.ModelInstanceGroup.KIND_CPU)
    with pytest.raises(LoadFailed, match=r"instance_group\[0\].count: -3"):
        instance_plan(config, Settings())
    config.instance_group[0].count = 2**31 - 1
    with pytest.raises(LoadFailed, match=r"instance_group\[0\].count"):
        instance_plan(config, Settings())
    config.instance_group[0].count = 0
    assert len(instance_plan(config, Settings())) == 1


@pytest.mark.parametrize("text", ["\u00b2", "\uff14", "1_0", "+4", "04", " 4", "-1", "0", "99999999999999999999999"])
def test_thread_parameters_are_strict(text: str) -> None:
    config = mc.ModelConfig()
    config.parameters["intra_op_thread_count"].string_value = text
    with pytest.raises(LoadFailed, match="intra_op_thread_count"):
        thread_parameter(config, "intra_op_thread_count")


# ---- config files: only the model's own --------------------------------------------------------------------------
def test_config_file_linking_out_is_refused_alike_whether_its_target_exists(tmp_path: Path) -> None:
    secret = tmp_path / "secret.pbtxt"
    secret.write_text("max_batch_size: 4")
    messages = []
    for target in (secret, tmp_path / "missing.pbtxt", Path("/etc/passwd")):
        model = tmp_path / "repo" / f"m{len(messages)}"
        model.mkdir(parents=True)
        (model / "config.pbtxt").symlink_to(target)
        with pytest.raises(LoadFailed) as info:
            cfg.read_config(model)
        messages.append(info.value.message)
    assert len(set(messages)) == 1 and "outside the model folder" in messages[0]


def test_config_file_may_link_inside_its_model_folder(tmp_path: Path) -> None:
    (tmp_path / "shared.pbtxt").write_text("max_batch_size: 4")
    (tmp_path / "config.pbtxt").symlink_to("shared.pbtxt")
    assert cfg.read_config(tmp_path).config.max_batch_size == 4
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "config.pbtxt").symlink_to(loop / "config.pbtxt")
    with pytest.raises(LoadFailed, match=r"config\.pbtxt"):
        cfg.read_config(loop)


def test_config_file_size_and_encoding(tmp_path: Path) -> None:
    (tmp_path / "config.pbtxt").write_bytes(b"#" * (cfg.MAX_CONFIG_BYTES + 1))
    with pytest.raises(LoadFailed, match="larger than"):
        cfg.read_config(tmp_path)
    (tmp_path / "config.pbtxt").write_bytes(b"name: '\xff'")
    with pytest.raises(LoadFailed, match="UTF-8"):
        cfg.read_config(tmp_path)
