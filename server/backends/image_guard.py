"""A check, before the run, of the encoded images a model hands to onnxruntime-extensions' ``DecodeImage``.

onnxruntime-extensions 0.15 decodes JPEG with libjpeg's default error handler, which calls ``exit()`` on a
malformed file (microsoft/onnxruntime-extensions#1094), and a truncated file can make it loop: one bad upload
would end the whole server. So every graph input that feeds ``DecodeImage`` directly is first decoded by Pillow
(libjpeg/libpng behind an error path that raises), and a request whose bytes Pillow cannot decode completely is
refused with a 400 naming the input. Pillow also refuses decompression bombs. This costs one more decode per
image; it goes once the extensions return an error instead.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import onnx

from server.errors import InvalidInput, LoadFailed

DECODE_OPS = frozenset({("com.microsoft.extensions", "DecodeImage")})
FORMATS = ("JPEG", "PNG")
"""What DecodeImage reads (a PNG signature, else JPEG)."""

log = logging.getLogger("optiserve.backends")


def guarded_inputs(model_path: Path, label: str) -> frozenset[str]:
    """The graph inputs that feed DecodeImage directly (their bytes are checked per request). A DecodeImage on a
    computed tensor cannot be checked: that is logged. LoadFailed when Pillow, needed for the check, is missing."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {value.name for value in graph.input}
    guarded: set[str] = set()
    for node in graph.node:
        if (node.domain, node.op_type) not in DECODE_OPS or not node.input:
            continue
        if node.input[0] in inputs:
            guarded.add(node.input[0])
        else:
            log.warning(
                "%s: DecodeImage reads the computed tensor %r, which cannot be checked before the run; a malformed "
                "JPEG there ends the process (onnxruntime-extensions#1094)",
                label,
                node.input[0],
            )
    if guarded:
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise LoadFailed(
                f"{label}: DecodeImage's inputs are checked with Pillow, which is not installed; install it with "
                "`pip install optiserve[extensions]`"
            ) from None
    return frozenset(guarded)


def check_images(name: str, array: np.ndarray) -> None:
    """Every encoded image in ``array`` (UINT8, one image per last-axis row) decodes completely as JPEG or PNG;
    InvalidInput naming the input otherwise."""
    from PIL import Image

    if array.dtype != np.uint8:
        return  # the runtime refuses a wrong datatype itself
    rows = array.reshape(1, -1) if array.ndim <= 1 else array.reshape(int(np.prod(array.shape[:-1])), array.shape[-1])
    for row in rows:
        try:
            with Image.open(io.BytesIO(row.tobytes())) as image:
                if image.format not in FORMATS:
                    raise ValueError(f"{image.format} images are not decoded, only {' or '.join(FORMATS)}")
                image.load()
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise InvalidInput(f"input {name!r}: not a complete JPEG or PNG image ({exc})") from None
