"""Stand-ins for the OpenVINO plugin where this machine has none (it serves Intel CPUs only): a fake onnxruntime
module that records how the plugin is registered and sessions are made, and a plugin stand-in whose sessions
compute with onnxruntime's CPU kernels and behave like OpenVINO's at the precision they were given (bf16:
outputs rounded to bf16), or like its traps (bf16 without being asked, every node falling back to the CPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from optimizers import openvino
from optimizers.providers import CPU, OPENVINO


def _ep_device(ep_name: str, metadata: dict[str, str], vendor: str) -> SimpleNamespace:
    return SimpleNamespace(ep_name=ep_name, ep_metadata=metadata, device=SimpleNamespace(type="CPU", vendor=vendor))


class FakeSessionOptions:
    """Records config entries and the devices + options given to the plugin."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.added: list[tuple[list[Any], dict[str, str]]] = []

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value

    def add_provider_for_devices(self, devices: list[Any], options: dict[str, str]) -> None:
        self.added.append((list(devices), dict(options)))


class FakeOrt:
    """The parts of onnxruntime the plugin code touches. ``vendor``: the CPU's; the plugin offers it only when it
    is Intel. ``load_error``: what registering raises."""

    __version__ = "1.32.0"
    OrtHardwareDeviceType = SimpleNamespace(CPU="CPU")

    def __init__(self, vendor: str = "Intel", load_error: str = "") -> None:
        self.vendor, self.load_error = vendor, load_error
        self.registrations: list[tuple[str, str]] = []
        self.sessions: list[dict[str, Any]] = []
        self.cpu = _ep_device(CPU, {}, vendor)
        self.openvino = [_ep_device(OPENVINO, {"ov_device": "CPU"}, vendor)]
        if vendor == "Intel":  # meta devices of the plugin's own; never picked
            self.openvino.append(_ep_device(f"{OPENVINO}.AUTO", {"ov_device": "CPU", "ov_meta_device": "AUTO"}, vendor))

    def register_execution_provider_library(self, name: str, path: str) -> None:
        if self.load_error:
            raise RuntimeError(self.load_error)
        if any(known == name for known, _ in self.registrations):
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : EP library is already registered under {name}")
        self.registrations.append((name, path))

    def get_ep_devices(self) -> list[Any]:
        offered = self.openvino if self.registrations and self.vendor == "Intel" else []
        return [self.cpu, *offered]

    def InferenceSession(self, path: str, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        self.sessions.append({"path": path, "options": sess_options, "providers": providers, **kwargs})
        return SimpleNamespace(get_providers=lambda: [OPENVINO, CPU])


class FakeModule:
    """``onnxruntime_ep_openvino``."""

    @staticmethod
    def get_library_path() -> str:
        return "/plugins/libonnxruntime_providers_openvino_plugin.so"


def to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bf16 (8 bits of mantissa), as OpenVINO's bf16 kernels would leave them."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32).reshape(values.shape)


class StandInSession:
    """A real CPU session that answers like an OpenVINO one: outputs in bf16 when ``bf16``, nodes recorded on
    OpenVINO (or all on the CPU when ``falls_back``)."""

    def __init__(self, model_path: Path, bf16: bool, falls_back: bool) -> None:
        self._session = ort.InferenceSession(str(model_path), providers=[CPU])
        self._bf16, self._falls_back = bf16, falls_back
        self._nodes = len(onnx.load(str(model_path), load_external_data=False).graph.node)

    def run(self, names: Any, feed: dict[str, np.ndarray], *args: Any) -> list[np.ndarray]:
        outputs = self._session.run(names, feed, *args)
        return [to_bf16(o) if self._bf16 and o.dtype == np.float32 else o for o in outputs]

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return self._session.get_outputs()

    def get_providers(self) -> list[str]:
        return [CPU] if self._falls_back else [OPENVINO, CPU]

    def get_provider_graph_assignment_info(self) -> list[Any]:
        nodes = [SimpleNamespace(op_type="Op")] * self._nodes
        return [SimpleNamespace(ep_name=CPU if self._falls_back else OPENVINO, get_nodes=lambda: nodes)]


class StandInPlugin:
    """Takes :data:`optimizers.openvino.PLUGIN`'s place. Its checks are the real ones (explicit precision, the
    options passed on); ``silent_bf16`` computes bf16 whatever was asked (OpenVINO's default on AMX), ``falls_back``
    places every node on onnxruntime's CPU kernels, ``unavailable`` offers no device."""

    def __init__(self, *, silent_bf16: bool = False, falls_back: bool = False, unavailable: bool = False) -> None:
        self.silent_bf16, self.falls_back, self.unavailable = silent_bf16, falls_back, unavailable
        self.calls: list[dict[str, Any]] = []

    def availability(self) -> openvino.Availability:
        if self.unavailable:
            return openvino.Availability("1.8.1", reason="the plugin offers no device here (stand-in)")
        return openvino.Availability("1.8.1", ("CPU",))

    def create_session(
        self, model_path: Path, session_options: Any, options: dict[str, str], threads: int | None = None
    ) -> StandInSession:
        passed = openvino.plugin_options(options, threads)
        if self.unavailable:
            raise openvino.OpenVinoUnavailable(self.availability().reason)
        hint = openvino.precision_hint(options)
        self.calls.append({"model": Path(model_path), "passed": passed, "hint": hint, "threads": threads})
        return StandInSession(Path(model_path), hint == "bf16" or self.silent_bf16, self.falls_back)
