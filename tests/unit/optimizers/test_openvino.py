"""The OpenVINO engine: plugin registration and its absence, explicit precision on every session, never a
``providers`` argument beside the plugin, bf16 only where the CPU has it and never under ``precision: fp32``, and
a report that names the engine and precision that really ran. A stand-in plays OpenVINO here (the plugin offers
only Intel CPUs); test_openvino_real.py runs the real plugin where it offers a CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from optimizers import OptimizeOptions, Pipeline, engines, openvino
from optimizers.options import PruneOptions
from optimizers.providers import CPU, OPENVINO
from optimizers.report import format_table
from optimizers.runtime import SessionSpec, open_session
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, fake_device
from tests.unit.optimizers.openvino_fakes import FakeModule, FakeOrt, FakeSessionOptions, StandInPlugin

INTEL_AMX = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
INTEL_AVX512 = ("avx2", "fma", "avx512f", "avx512_vnni")
OPENVINO_STEPS = ("openvino_fp32", "openvino_bf16", "openvino_int8")


# ---- registration ------------------------------------------------------------------------------------------------
def test_registers_once_and_offers_the_intel_cpu() -> None:
    fake = FakeOrt()
    plugin = openvino.Plugin(fake, FakeModule())
    first, again = plugin.availability(), plugin.availability()
    assert first.devices == again.devices == ("CPU",) and first.offers("CPU") and not first.reason
    assert fake.registrations == [(openvino.REGISTRATION_NAME, FakeModule.get_library_path())]


def test_a_library_registered_before_is_not_an_error() -> None:
    fake = FakeOrt()
    fake.register_execution_provider_library(openvino.REGISTRATION_NAME, "/elsewhere.so")
    assert openvino.Plugin(fake, FakeModule()).availability().offers("CPU")


@pytest.mark.parametrize(
    ("fake", "module", "reason"),
    [
        (FakeOrt(vendor="AMD"), FakeModule(), "serves Intel hardware only (this CPU's vendor is AMD)"),
        (FakeOrt(load_error="cannot open shared object file"), FakeModule(), "did not load: cannot open shared"),
        (None, None, "onnxruntime-ep-openvino is not installed"),
    ],
    ids=["amd-cpu", "broken-library", "not-installed"],
)
def test_absence_is_a_reason(monkeypatch: pytest.MonkeyPatch, fake: Any, module: Any, reason: str) -> None:
    if module is None:  # the package is missing: importing it fails
        monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)
        fake = FakeOrt()
    found = openvino.Plugin(fake, module).availability()
    assert found.devices == () and not found.offers("CPU") and reason in found.reason


def test_an_onnxruntime_without_plugin_support_is_a_reason() -> None:
    class OldOrt:
        __version__ = "1.20.0"

    found = openvino.Plugin(OldOrt(), FakeModule()).availability()
    assert found.devices == () and "needs 1.23+" in found.reason


def test_the_real_probe_reports_what_it_found() -> None:
    found = openvino.availability()  # whatever this machine is: a device, or why not
    assert found.devices or found.reason


# ---- sessions ----------------------------------------------------------------------------------------------------
def test_every_openvino_session_sets_its_precision_explicitly(tmp_path: Path) -> None:
    plugin = openvino.Plugin(FakeOrt(), FakeModule())
    for implicit in ({}, {"device_type": "CPU"}, {"precision": "FP32"}, {"load_config": '{"CPU": {}}'}):
        with pytest.raises(openvino.OpenVinoError, match="must set its precision"):
            plugin.create_session(tmp_path / "m.onnx", FakeSessionOptions(), implicit)
    for engine in engines.OPENVINO_CANDIDATES:  # every candidate the optimizer builds
        assert engine.spec.precision_hint in ("f32", "bf16"), engine.name
        assert engine.spec.precision_hint == ("bf16" if engine.family == "bf16" else "f32"), engine.name


def test_a_session_gets_the_plugin_device_and_no_providers_argument(tmp_path: Path) -> None:
    fake = FakeOrt()
    fake.openvino.append(fake.openvino[0])  # registered twice (by someone else too): the device is listed twice
    options = FakeSessionOptions()
    openvino.Plugin(fake, FakeModule()).create_session(tmp_path / "m.onnx", options, openvino.provider_options("bf16"))
    ((devices, passed),) = options.added
    assert [d.ep_name for d in devices] == [OPENVINO] and devices[0].ep_metadata["ov_device"] == "CPU"
    assert passed == {"load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})}  # no device_type
    assert options.entries[openvino.ASSIGNMENT_ENTRY] == "1"
    (session,) = fake.sessions
    # providers beside the plugin would replace it: onnxruntime's CPU kernels would run everything
    assert session["providers"] is None and session["options"] is options


def test_instance_threads_bind_openvino(tmp_path: Path) -> None:
    options = FakeSessionOptions()
    openvino.Plugin(FakeOrt(), FakeModule()).create_session(
        tmp_path / "m.onnx", options, openvino.provider_options("f32"), threads=3
    )
    config = json.loads(options.added[0][1]["load_config"])
    assert config == {"CPU": {"INFERENCE_NUM_THREADS": 3, "INFERENCE_PRECISION_HINT": "f32"}}


def test_the_model_cache_folder_is_passed_on_and_made(tmp_path: Path) -> None:
    fake, options = FakeOrt(), FakeSessionOptions()
    cache = tmp_path / "cache" / "openvino"
    plugin = openvino.Plugin(fake, FakeModule())
    plugin.create_session(tmp_path / "m.onnx", options, openvino.provider_options("f32", cache=cache))
    ((_, passed),) = options.added
    assert passed[openvino.CACHE_OPTION] == str(cache) and cache.is_dir()
    assert "CACHE_DIR" not in passed["load_config"]  # the plugin would drop it there: the CPU does not list it


def test_no_device_is_an_error_naming_why(tmp_path: Path) -> None:
    plugin = openvino.Plugin(FakeOrt(vendor="AMD"), FakeModule())
    with pytest.raises(openvino.OpenVinoUnavailable, match="Intel hardware only"):
        plugin.create_session(tmp_path / "m.onnx", FakeSessionOptions(), openvino.provider_options("f32"))


def test_placement_counts_nodes_by_provider_and_refuses_a_full_fallback() -> None:
    class Session:
        def get_provider_graph_assignment_info(self) -> list[Any]:
            return [_subgraph(OPENVINO, 3), _subgraph(CPU, 1), _subgraph(OPENVINO, 2)]

    nodes = openvino.placement(Session())
    assert nodes == {OPENVINO: 5, CPU: 1}
    openvino.check_placement(nodes)
    with pytest.raises(openvino.OpenVinoError, match="took no node"):
        openvino.check_placement({CPU: 6})
    assert openvino.placement(object()) == {}  # no record kept: nothing claimed


def _subgraph(ep_name: str, count: int) -> Any:
    return SimpleNamespace(ep_name=ep_name, get_nodes=lambda: [None] * count)


def test_open_session_goes_through_the_plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stand_in = StandInPlugin()
    monkeypatch.setattr(openvino, "PLUGIN", stand_in)
    model = models.save(models.trained_digits().model, tmp_path)
    session = open_session(model, engines.openvino_spec("f32"))
    assert openvino.placement(session) == {OPENVINO: 5}
    assert stand_in.calls[0]["hint"] == "f32"


def test_spec_names_engine_device_and_precision() -> None:
    spec = engines.openvino_spec("bf16")
    assert (spec.engine, spec.precision_hint, spec.chooses_providers) == ("openvino", "bf16", True)
    assert engines.describe(spec, "bf16", {OPENVINO: 4}) == {
        "engine": "openvino",
        "precision": "bf16",
        "device": "CPU",
        "precision_hint": "bf16",
        "providers": [OPENVINO, CPU],
        "nodes": {OPENVINO: 4},
    }
    assert SessionSpec().engine == "onnxruntime" and SessionSpec().precision_hint is None


# ---- candidates ----------------------------------------------------------------------------------------------------
def test_bf16_only_where_the_cpu_has_it() -> None:
    bf16 = next(e for e in engines.OPENVINO_CANDIDATES if e.family == "bf16")
    amx = fake_device(cpu_flags=INTEL_AMX, openvino_devices=("CPU",))
    avx512 = fake_device(cpu_flags=INTEL_AVX512, openvino_devices=("CPU",))
    assert engines.skip_reason(bf16, amx, set()) is None
    assert "neither avx512_bf16 nor amx_bf16" in str(engines.skip_reason(bf16, avx512, set()))
    int8 = next(e for e in engines.OPENVINO_CANDIDATES if e.family == "int8")
    assert "needs the int8_static model" in str(engines.skip_reason(int8, amx, set()))
    assert engines.skip_reason(int8, amx, {"int8_static"}) is None
    absent = fake_device(cpu_flags=INTEL_AMX, openvino_note="onnxruntime-ep-openvino is not installed")
    assert "unavailable: onnxruntime-ep-openvino is not installed" in str(engines.skip_reason(bf16, absent, {}))
    assert engines.candidates("cuda") == () and engines.candidates("tensorrt") == ()


# ---- the pipeline with OpenVINO standing in ------------------------------------------------------------------------
def _run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    latencies: dict[str, float],
    options: OptimizeOptions | None = None,
    plugin: StandInPlugin | None = None,
    flags: tuple[str, ...] = INTEL_AMX,
) -> tuple[Any, dict[str, dict[str, Any]], StandInPlugin]:
    stand_in = plugin or StandInPlugin()
    monkeypatch.setattr(openvino, "PLUGIN", stand_in)
    device = fake_device(cpu_flags=flags, openvino_devices=("CPU",), openvino_version="1.8.1")
    model = models.save(models.trained_digits().model, tmp_path / "digits")
    pipeline = Pipeline(tmp_path / "cache", device=device, benchmark=FakeBenchmark(latencies))
    result = pipeline.run(model, options or OptimizeOptions())
    return result, {step["name"]: step for step in result.report["steps"]}, stand_in


def test_openvino_bf16_wins_when_fastest_and_the_report_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    latencies = {"original": 10.0, "int8_dynamic": 6.0, "int8_static": 6.0, "openvino_fp32": 9.0}
    result, steps, stand_in = _run(tmp_path, monkeypatch, {**latencies, "openvino_bf16": 2.0, "openvino_int8": 3.0})
    assert result.report["selected"] == "openvino_bf16" and steps["openvino_bf16"]["status"] == "applied"
    assert result.session == engines.openvino_spec("bf16", cache_root=tmp_path / "cache") and result.family == "bf16"
    assert result.report["engine"] == {
        "engine": "openvino",
        "precision": "bf16",
        "device": "CPU",
        "precision_hint": "bf16",
        "providers": [OPENVINO, CPU],
        "nodes": {OPENVINO: 5},
    }
    bf16 = steps["openvino_bf16"]
    assert bf16["thresholds"] == {"rel_l2": 1e-2}  # FP16's class of budget
    assert 1e-4 < bf16["accuracy"]["rel_l2"] < 1e-2  # really computed in bf16: more error than fp32 allows
    assert steps["openvino_fp32"]["accuracy"]["rel_l2"] < 1e-6
    assert steps["openvino_int8"]["details"]["source"] == "int8_static"
    assert len({call["model"] for call in stand_in.calls}) == 2  # the original, and int8_static's QDQ model
    for step in OPENVINO_STEPS:
        assert steps[step]["details"]["engine"]["engine"] == "openvino"
    assert all(call["passed"]["load_config"] for call in stand_in.calls)
    assert "engine openvino CPU bf16 (hint bf16)" in format_table(result.report)


def test_every_openvino_session_compiles_into_the_optimizer_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    latencies = {"original": 10.0, "openvino_fp32": 2.0}
    result, _, stand_in = _run(tmp_path, monkeypatch, latencies, OptimizeOptions(precision="fp32"))
    cache = openvino.cache_dir(tmp_path / "cache")
    assert result.report["selected"] == "openvino_fp32"
    assert result.session.provider_options[OPENVINO][openvino.CACHE_OPTION] == str(cache)
    assert stand_in.calls and all(call["passed"][openvino.CACHE_OPTION] == str(cache) for call in stand_in.calls)
    # a restart reads the stored result: the served session names the same cache, so OpenVINO loads from it
    device = fake_device(cpu_flags=INTEL_AMX, openvino_devices=("CPU",), openvino_version="1.8.1")
    model = models.save(models.trained_digits().model, tmp_path / "digits")
    restarted = Pipeline(tmp_path / "cache", device=device).lookup(model, OptimizeOptions(precision="fp32"))
    assert restarted is not None and restarted.summary.cache_hit and restarted.session == result.session


def test_precision_fp32_never_runs_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    latencies = {"original": 10.0, "graph_opt": 9.0, "openvino_fp32": 5.0, "openvino_bf16": 1.0}
    result, steps, stand_in = _run(tmp_path, monkeypatch, latencies, OptimizeOptions(precision="fp32"))
    assert steps["openvino_bf16"]["status"] == "skipped" and "precision fp32" in steps["openvino_bf16"]["reason"]
    assert steps["openvino_int8"]["status"] == "skipped"
    assert result.report["selected"] == "openvino_fp32"
    assert result.report["engine"]["precision_hint"] == "f32" and result.report["engine"]["precision"] == "fp32"
    assert {call["hint"] for call in stand_in.calls} == {"f32"}


LOSSY = ("int8_dynamic", "int8_static", "fp16", "prune", "openvino_bf16", "openvino_int8")


def test_precision_fp32_refuses_every_lossy_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fastest = dict.fromkeys(LOSSY, 0.5)  # each would win on speed
    options = OptimizeOptions(precision="fp32", prune=PruneOptions())  # pruning asked for, and still refused
    result, steps, stand_in = _run(tmp_path, monkeypatch, {"original": 10.0, **fastest}, options)
    for name in LOSSY:
        assert (steps[name]["status"], steps[name]["reason"]) == ("skipped", "precision fp32: no lossy step is applied")
    ran = [step for step in steps.values() if step["accuracy"]]
    assert ran and all(step["thresholds"] == {"rel_l2": 1e-4} for step in ran)  # only the lossless budget
    assert result.family == "fp32" and {call["hint"] for call in stand_in.calls} == {"f32"}


def test_precision_bf16_keeps_openvino_bf16_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    latencies = {"original": 10.0, "openvino_bf16": 2.0, "graph_opt": 1.0, "int8_static": 1.0}
    result, steps, _ = _run(tmp_path, monkeypatch, latencies, OptimizeOptions(precision="bf16"))
    assert result.report["selected"] == "openvino_bf16" and result.family == "bf16"
    assert result.report["engine"]["precision_hint"] == "bf16" and result.report["precision"] == "bf16"
    others = [name for name in steps if name not in ("openvino_bf16", "compile")]
    for name in others:
        assert steps[name]["status"] == "skipped" and "keeps only bf16" in steps[name]["reason"], steps[name]


def test_precision_bf16_on_a_cpu_without_it_says_why_nothing_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, steps, stand_in = _run(tmp_path, monkeypatch, {}, OptimizeOptions(precision="bf16"), flags=INTEL_AVX512)
    assert result.report["selected"] == "original" and not stand_in.calls
    assert "neither avx512_bf16 nor amx_bf16" in steps["openvino_bf16"]["reason"]
    assert "openvino_bf16 skipped (this CPU has neither avx512_bf16" in result.report["summary"]


def test_a_cpu_without_bf16_never_tries_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, steps, stand_in = _run(tmp_path, monkeypatch, {"openvino_bf16": 0.1}, flags=INTEL_AVX512)
    assert steps["openvino_bf16"]["status"] == "skipped" and "avx512_bf16" in steps["openvino_bf16"]["reason"]
    assert "bf16" not in {call["hint"] for call in stand_in.calls}
    assert result.report["selected"] != "openvino_bf16"


def test_silent_bf16_is_never_reported_as_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenVINO's default on AMX: bf16 without being asked. The fp32 budget catches it, whatever its speed.
    plugin = StandInPlugin(silent_bf16=True)
    latencies = {"openvino_fp32": 1.0}
    result, steps, _ = _run(tmp_path, monkeypatch, latencies, OptimizeOptions(precision="fp32"), plugin)
    assert steps["openvino_fp32"]["status"] == "rejected" and "rel_l2" in steps["openvino_fp32"]["reason"]
    assert result.report["selected"] != "openvino_fp32" and result.report["engine"]["engine"] == "onnxruntime"


def test_a_full_fallback_to_the_cpu_is_not_reported_as_openvino(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = StandInPlugin(falls_back=True)
    result, steps, _ = _run(tmp_path, monkeypatch, {"openvino_fp32": 1.0, "openvino_bf16": 1.0}, plugin=plugin)
    for name in ("openvino_fp32", "openvino_bf16"):
        assert steps[name]["status"] == "rejected" and "took no node" in steps[name]["reason"], steps[name]
    assert not result.report["selected"].startswith("openvino")


def test_without_the_plugin_the_steps_say_why(tmp_path: Path) -> None:
    device = fake_device(openvino_note="the plugin offers no device here: it serves Intel hardware only")
    model = models.save(models.trained_digits().model, tmp_path / "digits")
    result = Pipeline(tmp_path / "cache", device=device, benchmark=FakeBenchmark()).run(model, OptimizeOptions())
    steps = {step["name"]: step for step in result.report["steps"]}
    for name in OPENVINO_STEPS:
        assert steps[name]["status"] == "skipped" and "Intel hardware only" in steps[name]["reason"]


# ---- the server's --execution-providers ------------------------------------------------------------------------------
def test_a_listed_openvino_that_is_unavailable_is_reported_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = fake_device(openvino_note="the plugin offers no device here: it serves Intel hardware only")
    model = models.save(models.trained_digits().model, tmp_path / "digits")
    options = OptimizeOptions(execution_providers=(OPENVINO, CPU))
    with caplog.at_level("WARNING", logger="optiserve.optimizers"):
        report = Pipeline(tmp_path / "cache", device=device, benchmark=FakeBenchmark()).run(model, options).report
    (note,) = report["notes"]
    assert f"lists {OPENVINO}, which is unavailable here" in note and "Intel hardware only" in note
    assert note in caplog.text and f"note: {note}" in format_table(report)  # the offline command prints it
    for step in (s for s in report["steps"] if s["name"] in OPENVINO_STEPS):
        assert step["status"] == "skipped"
        assert step["reason"].startswith(f"{OPENVINO} is listed in execution_providers but unavailable"), step


def test_a_provider_list_without_openvino_keeps_it_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = OptimizeOptions(execution_providers=(CPU,))
    result, steps, stand_in = _run(tmp_path, monkeypatch, {"openvino_fp32": 0.1, "openvino_bf16": 0.1}, options)
    assert not stand_in.calls and not result.report["notes"]
    for name in OPENVINO_STEPS:
        assert steps[name]["reason"] == f"{OPENVINO} is not among the server's execution_providers ({CPU})"
    assert not result.report["selected"].startswith("openvino")


def test_a_listed_provider_this_onnxruntime_lacks_is_a_note() -> None:
    device = fake_device(openvino_devices=("CPU",))
    assert engines.provider_notes((OPENVINO, CPU), device) == []
    (note,) = engines.provider_notes(("CUDAExecutionProvider", CPU), device)
    assert "lists CUDAExecutionProvider, which this onnxruntime lacks" in note
