"""Keep onnxruntime's own chatter while the optimizer works on a model out of the server log at INFO, and at DEBUG
where it can still help: its quantizer's notes and warnings ("Created a copy of bias input...", "Quantization
parameters for tensor ... not specified", "Please consider to run pre-processing"), its symbolic shape
inference's progress, and the warnings its C++ logger prints while the quantizer's own sessions load a graph
("Removing initializer ... It is not used by any node"). Everything the optimizer concludes from these runs is in
the report already.

Two mechanisms, because onnxruntime logs in two places:

- Python records from onnxruntime's and onnx's modules (their named loggers, and module-level ``logging.info()``
  calls, which land on the root logger) are demoted to DEBUG by a filter (errors are left alone);
- onnxruntime's C++ default logger is set to fatal errors only while a quantizer runs (:func:`quieted`), unless
  the optimizer's logger is at DEBUG: a quantizer setting that fails makes its calibration session print the
  error it then raises, and the fallback loop reports that exception anyway. That logger is process-wide: a
  session another thread creates or runs meanwhile without a log level of its own is as quiet, for those
  seconds."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger("optiserve.optimizers")

LIBRARIES = ("onnxruntime", "onnx")
ORT_WARNING, ORT_FATAL = 2, 4
"""onnxruntime's C++ log severities (its default is warning)."""


def _package_dirs() -> tuple[str, ...]:
    """The folders onnxruntime's and onnx's modules live in (where their root-logger records come from)."""
    found: list[str] = []
    for name in LIBRARIES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            found.extend(os.path.join(os.path.abspath(p), "") for p in spec.submodule_search_locations)
    return tuple(found)


class DemoteToDebug(logging.Filter):
    """Demote a library's records below ERROR to DEBUG, and drop them unless their logger is enabled for DEBUG.
    Records of any other origin pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._dirs = _package_dirs()

    def is_library(self, record: logging.LogRecord) -> bool:
        """Whether a library wrote ``record`` (by logger name, or for root records by the file that logged it)."""
        if record.name.split(".")[0] in LIBRARIES:
            return True
        return record.name == "root" and os.path.abspath(record.pathname).startswith(self._dirs)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not self.is_library(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name if record.name != "root" else None).isEnabledFor(logging.DEBUG)


_FILTER = DemoteToDebug()
_lock = threading.Lock()
_quiet_depth = 0


def demote_library_records() -> None:
    """Put the filter on the root logger and on every onnxruntime/onnx logger created so far (a filter on a
    logger only sees the records made there, not those propagating through it). Idempotent; call it after the
    library modules are imported, since each creates its logger on import."""
    names = [name for name in logging.Logger.manager.loggerDict if name.split(".")[0] in LIBRARIES]
    for logger in (logging.getLogger(), *(logging.getLogger(name) for name in names)):
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """While onnxruntime's quantizer (or its pre-processing) runs: its Python records demoted to DEBUG and, unless
    the optimizer logs at DEBUG, its C++ logger at fatal errors only. Nested and concurrent uses share one setting; the
    last one out restores the warning level."""
    global _quiet_depth
    demote_library_records()
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    import onnxruntime as ort

    with _lock:
        if _quiet_depth == 0:
            ort.set_default_logger_severity(ORT_FATAL)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                ort.set_default_logger_severity(ORT_WARNING)
