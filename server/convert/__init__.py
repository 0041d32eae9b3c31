"""Framework models in: PyTorch (torch.export archives), TensorFlow (SavedModel), XGBoost (JSON/UBJ) and
LightGBM (text) become guarded ONNX at load time; scikit-learn pickles, TorchScript and Keras files only
through the offline ``optiserve convert`` on the user's own machine. Nothing here imports a framework at
import time; the heavy converters are optional extras."""

from __future__ import annotations

from server.convert.registry import Converter, detect, is_convertible
from server.convert.service import ConversionRejected, ConversionResult, convert_version

__all__ = ["ConversionRejected", "ConversionResult", "Converter", "convert_version", "detect", "is_convertible"]
