"""OpenVINO as an onnxruntime engine, through the ``onnxruntime-ep-openvino`` plugin on the stock onnxruntime wheel:
registration, device lookup, explicit precision, and the one way to open a session with it (shared by the
optimizer and the server, so the server builds exactly the session that was timed).

Traps this module exists for (each has a test):

- The plugin is not in ``onnxruntime.get_available_providers()``: it is registered as a library
  (``register_execution_provider_library``), its devices come from ``get_ep_devices()`` and a session gets it via
  ``SessionOptions.add_provider_for_devices``. The plugin offers Intel hardware only (it matches onnxruntime's
  devices by vendor id), so on other CPUs it registers and offers no device.
- Passing ``providers=[...]`` to ``InferenceSession`` as well replaces the plugin: everything runs on onnxruntime's
  CPU kernels with only a Python warning. :meth:`Plugin.create_session` never passes providers.
- OpenVINO computes in bf16 by default on CPUs with bf16 hardware (AMX, and avx512_bf16 alone: OpenVINO 2026.4
  reports bf16 as its default on an AMD EPYC without AMX), without saying so; the plugin ignores its ``precision``
  provider option with only a warning. Every session here sets ``INFERENCE_PRECISION_HINT`` in ``load_config`` and a
  session without it is refused (:class:`OpenVinoError`). The values are lowercase: OpenVINO refuses ``F32``.
- The plugin ignores ``device_type`` and ``num_of_threads`` too (device: the OrtEpDevice handed over; threads:
  ``INFERENCE_NUM_THREADS`` in ``load_config``).
- OpenVINO compiles every session's model again (seconds for a large one) unless it has a model cache. The
  plugin's ``cache_dir`` option turns it on; ``CACHE_DIR`` in ``load_config`` does not: the plugin passes on only
  the properties the device lists as its own, and OpenVINO's CPU lists no ``CACHE_DIR`` (it is a property of
  OpenVINO's core), so the plugin would skip it with a warning. Specs built here keep the cache under the
  optimizer's cache folder (:func:`cache_dir`), so the server's session for a variant (and a restart's) reads
  the model the optimizer's timing session compiled.

A spec names the device with OpenVINO's ``device_type`` option (``CPU``), which picks the plugin's device here and
is not passed on; everything else in its provider options goes to the plugin as is."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optimizers.providers import OPENVINO

log = logging.getLogger("optiserve.optimizers")

PACKAGE = "onnxruntime-ep-openvino"
"""The plugin's distribution (installed by default on Linux x86-64; elsewhere ``pip install 'optiserve[openvino]'``)."""
REGISTRATION_NAME = "optiserve-openvino"
PRECISION_HINT = "INFERENCE_PRECISION_HINT"
NUM_THREADS = "INFERENCE_NUM_THREADS"
DEVICE_OPTION = "device_type"
LOAD_CONFIG = "load_config"
CACHE_OPTION = "cache_dir"
"""The plugin's model-cache folder option (OpenVINO's core ``CACHE_DIR``)."""
ASSIGNMENT_ENTRY = "session.record_ep_graph_assignment_info"
"""Session config entry that makes onnxruntime record which provider got each node (read by :func:`placement`)."""

Hint = Literal["f32", "bf16"]
"""OpenVINO's names for the CPU precisions we ask for (lowercase: ``F32`` is refused, ``BF16`` accepted)."""


class OpenVinoError(RuntimeError):
    """An OpenVINO session asked for in a way that could run something other than what was asked."""


class OpenVinoUnavailable(OpenVinoError):
    """The plugin is missing, or offers no device of the kind asked for; the message says why."""


@dataclass(frozen=True)
class Availability:
    """What the plugin offers in this process: its version, OpenVINO's device names (``CPU``, ``GPU``...) and,
    when it offers none, why."""

    version: str = ""
    devices: tuple[str, ...] = ()
    reason: str = ""

    def offers(self, device: str = "CPU") -> bool:
        """Whether ``device`` can be used."""
        return device in self.devices


class Plugin:
    """The plugin in one onnxruntime: registered on first use (once, thread-safe) under
    :data:`REGISTRATION_NAME`. ``ort`` and ``module`` default to the installed ``onnxruntime`` and
    ``onnxruntime_ep_openvino`` (imported lazily); tests hand in stand-ins."""

    def __init__(self, ort: Any = None, module: Any = None) -> None:
        self._ort, self._module = ort, module
        self._lock = threading.Lock()
        self._availability: Availability | None = None

    @property
    def ort(self) -> Any:
        """The onnxruntime module sessions are made with."""
        if self._ort is None:
            import onnxruntime

            self._ort = onnxruntime
        return self._ort

    def availability(self) -> Availability:
        """Register the plugin (first call only) and say what it offers. Never raises: a missing package, an
        onnxruntime without plugin support or a library that fails to load is a reason."""
        with self._lock:
            if self._availability is None:
                self._availability = self._register()
                found = self._availability
                if found.devices:
                    log.info("OpenVINO %s offers %s", found.version, ", ".join(found.devices))
                else:
                    log.info("OpenVINO engine unavailable: %s", found.reason)
            return self._availability

    def _register(self) -> Availability:
        ort, module = self.ort, self._module
        if module is None:
            try:
                module = importlib.import_module("onnxruntime_ep_openvino")
            except ImportError:
                return Availability(reason=f"{PACKAGE} is not installed (pip install 'optiserve[openvino]')")
        version = _version()
        if not hasattr(ort, "register_execution_provider_library"):
            why = f"onnxruntime {ort.__version__} cannot load plugin providers (needs 1.23+)"
            return Availability(version, reason=why)
        try:
            ort.register_execution_provider_library(REGISTRATION_NAME, module.get_library_path())
        except Exception as exc:  # onnxruntime raises its own Fail type
            if "already registered" not in str(exc):
                return Availability(version, reason=f"the plugin library did not load: {exc}")
        devices = tuple(sorted({str(d.ep_metadata.get("ov_device", "")) for d in self._devices()} - {""}))
        if devices:
            return Availability(version, devices)
        vendors = sorted({str(d.device.vendor) for d in ort.get_ep_devices() if _is_cpu(ort, d)})
        found = f"this CPU's vendor is {', '.join(vendors)}" if vendors else "onnxruntime lists no CPU"
        why = f"the plugin offers no device here: it serves Intel hardware only ({found})"
        return Availability(version, reason=why)

    def _devices(self, device: str | None = None) -> list[Any]:
        """The plugin's OrtEpDevices (those for OpenVINO's ``device`` only, when given)."""
        found = [d for d in self.ort.get_ep_devices() if d.ep_name == OPENVINO]
        return [d for d in found if device is None or d.ep_metadata.get("ov_device") == device]

    def create_session(
        self, model_path: Path, session_options: Any, options: dict[str, str], threads: int | None = None
    ) -> Any:
        """An InferenceSession on OpenVINO (nodes it cannot take run on onnxruntime's CPU kernels). Raises
        :class:`OpenVinoUnavailable` when the plugin offers no such device and :class:`OpenVinoError` when the
        options leave the precision implicit. The session records which provider got each node
        (see :func:`placement`)."""
        passed = plugin_options(options, threads)
        device = device_of(options)
        status = self.availability()
        if not status.offers(device):
            offered = ", ".join(status.devices)
            raise OpenVinoUnavailable(status.reason or f"the plugin offers no {device} device (only {offered})")
        if passed.get(CACHE_OPTION):  # OpenVINO writes blobs there; the folder may not exist yet
            Path(passed[CACHE_OPTION]).mkdir(parents=True, exist_ok=True)
        session_options.add_session_config_entry(ASSIGNMENT_ENTRY, "1")
        # One device: the plugin refuses several for a plain device (a second registration lists it twice).
        session_options.add_provider_for_devices(self._devices(device)[:1], passed)
        # No providers argument: onnxruntime would use it instead of the plugin, with only a warning.
        return self.ort.InferenceSession(str(model_path), sess_options=session_options)


PLUGIN = Plugin()
"""The process's plugin, on the installed onnxruntime."""


def availability() -> Availability:
    """What the plugin offers in this process (see :meth:`Plugin.availability`)."""
    return PLUGIN.availability()


def _version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _is_cpu(ort: Any, ep_device: Any) -> bool:
    return bool(ep_device.device.type == ort.OrtHardwareDeviceType.CPU)


# ---- provider options --------------------------------------------------------------------------------------------
def provider_options(hint: Hint, device: str = "CPU", cache: Path | None = None) -> dict[str, str]:
    """The plugin options for a session on ``device`` computing in ``hint`` (always explicit), with OpenVINO's
    model cache in ``cache`` when given."""
    options = {DEVICE_OPTION: device, LOAD_CONFIG: json.dumps({device: {PRECISION_HINT: hint}}, sort_keys=True)}
    if cache is not None:
        options[CACHE_OPTION] = str(cache)
    return options


def cache_dir(cache_root: Path) -> Path:
    """OpenVINO's model cache under an optimizer cache root: ``ROOT/openvino``. The optimizer's guard and timing
    sessions fill it and the served instances read it (like TensorRT's engine cache, it is not counted in the
    optimizer cache's size cap)."""
    return Path(cache_root) / "openvino"


def device_of(options: dict[str, str]) -> str:
    """The OpenVINO device a spec's options name (``CPU`` when unnamed)."""
    return options.get(DEVICE_OPTION, "CPU")


def load_config(options: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``load_config`` parsed (empty when absent); a malformed one is an :class:`OpenVinoError`."""
    text = options.get(LOAD_CONFIG, "")
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise OpenVinoError(f"OpenVINO load_config is not JSON: {exc}") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise OpenVinoError('OpenVINO load_config must map a device to its properties: {"CPU": {...}}')
    return parsed


def precision_hint(options: dict[str, str]) -> str | None:
    """The ``INFERENCE_PRECISION_HINT`` the options set for their device; None when they leave it to OpenVINO."""
    value = load_config(options).get(device_of(options), {}).get(PRECISION_HINT)
    return str(value) if value is not None else None


def plugin_options(options: dict[str, str], threads: int | None = None) -> dict[str, str]:
    """What goes to the plugin: the options less ``device_type``, refused unless the precision is explicit.
    ``threads`` sets OpenVINO's own thread count (onnxruntime's intra-op threads do not bind it) unless the
    load_config already does."""
    device = device_of(options)
    if precision_hint(options) is None:
        raise OpenVinoError(
            f"an OpenVINO session must set its precision: load_config {{{device!r}: {{{PRECISION_HINT!r}: ...}}}} "
            "(OpenVINO picks bf16 by itself on CPUs with bf16 hardware; its 'precision' option is ignored)"
        )
    passed = {key: value for key, value in options.items() if key != DEVICE_OPTION}
    if threads is not None:
        config = load_config(options)
        config[device] = {NUM_THREADS: threads, **config[device]}
        passed[LOAD_CONFIG] = json.dumps(config, sort_keys=True)
    return passed


# ---- what ran ----------------------------------------------------------------------------------------------------
def placement(session: Any) -> dict[str, int]:
    """How many nodes each provider really runs, as onnxruntime recorded it (empty where it kept no record: a
    session opened without :data:`ASSIGNMENT_ENTRY`, or an onnxruntime older than 1.23)."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # not recorded, or no such API
        return {}
    counts: Counter[str] = Counter()
    for subgraph in subgraphs:
        counts[str(subgraph.ep_name)] += len(subgraph.get_nodes())
    return dict(counts)


def check_placement(nodes: dict[str, int]) -> None:
    """Refuse a session where OpenVINO took no node (everything silently on onnxruntime's CPU kernels)."""
    if nodes and not nodes.get(OPENVINO):
        where = ", ".join(f"{name}: {count}" for name, count in sorted(nodes.items()))
        raise OpenVinoError(f"OpenVINO took no node of this model (nodes by provider: {where})")
