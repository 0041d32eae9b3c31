"""Two pipelines built in code: an image one (JPEG bytes -> decode/resize/normalize in ONNX with
onnxruntime-extensions' DecodeImage -> a small CNN -> top-5 with labels) and a text one (a string -> the
extensions' BertTokenizer with a tiny vocabulary -> a small encoder -> a label), each as Triton ensemble configs
over member models, plus JPEG bytes made with Pillow. Used by the e2e tests and bench/ensemble.py.

The image pipeline takes the encoded file as ``TYPE_UINT8 dims: [-1]`` (as Triton's DALI and Python-backend image
ensembles do): DecodeImage reads a UINT8 tensor, and ONNX has no operator that turns a BYTES element into its
bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import fixtures

EXTENSIONS_IMAGE = "com.microsoft.extensions"  # DecodeImage's domain in onnxruntime-extensions
EXTENSIONS_TEXT = "ai.onnx.contrib"  # the tokenizers' and string ops' domain
SIZE = 16
CLASSES = 10
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
IMAGE_LABELS = [f"class_{i}" for i in range(CLASSES)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "great", "bad", "awful", "fun", "plot"]
SENTIMENTS = ["negative", "neutral", "positive"]


def _model(nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list, domain: str = "") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "pipeline_member", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", fixtures.OPSET)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = fixtures.IR_VERSION
    onnx.checker.check_model(model)
    return model


def image_preprocess(size: int = SIZE) -> onnx.ModelProto:
    """jpeg UINT8 [n] (a whole encoded file) -> DecodeImage (RGB, HWC) -> NCHW float -> bilinear resize to
    size x size -> (x - mean) / std -> pixels FP32 [1, 3, size, size]."""
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 3, size, size], np.int64), "sizes"),
        numpy_helper.from_array(MEAN.reshape(1, 3, 1, 1), "mean"),
        numpy_helper.from_array(STD.reshape(1, 3, 1, 1), "std"),
    ]
    nodes = [
        helper.make_node("DecodeImage", ["jpeg"], ["hwc"], domain=EXTENSIONS_IMAGE, color_space="rgb"),
        helper.make_node("Cast", ["hwc"], ["hwc_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["hwc_f"], ["chw"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["chw", "axes"], ["nchw"]),
        helper.make_node("Resize", ["nchw", "", "", "sizes"], ["resized"], mode="linear"),
        helper.make_node("Sub", ["resized", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["pixels"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("jpeg", TensorProto.UINT8, ["bytes"])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, size, size])],
        inits,
        EXTENSIONS_IMAGE,
    )


def small_cnn(size: int = SIZE, classes: int = CLASSES, seed: int = 0) -> onnx.ModelProto:
    """pixels FP32 [batch, 3, size, size] -> Conv 3x3 (8) -> Relu -> Conv 3x3 stride 2 (16) -> Relu -> global
    average pool -> Gemm -> logits FP32 [batch, classes]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.standard_normal((16, classes)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixels", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )


def bert_tokenizer(vocab: list[str] = VOCAB) -> onnx.ModelProto:
    """text STRING [1] -> the extensions' BertTokenizer (lower case, [CLS] ... [SEP]) -> input_ids INT64 [n]."""
    nodes = [
        helper.make_node(
            "BertTokenizer",
            ["text"],
            ["input_ids", "token_type_ids", "attention_mask"],
            domain=EXTENSIONS_TEXT,
            vocab_file="\n".join(vocab),
            do_lower_case=1,
        )
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["tokens"])],
        [],
        EXTENSIONS_TEXT,
    )


def tiny_encoder(vocab_size: int = len(VOCAB), dim: int = 8, classes: int = len(SENTIMENTS)) -> onnx.ModelProto:
    """input_ids INT64 [n] -> embedding -> mean over tokens -> tanh -> Gemm -> logits FP32 [1, classes]."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab_size, dim)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.standard_normal((dim, classes)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Tanh", ["mean"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w", "b"], ["logits"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        inits,
    )


PREPROCESS_CONFIG = f"""
max_batch_size: 0
input [ {{ name: "jpeg" data_type: TYPE_UINT8 dims: [ -1 ] }} ]
output [ {{ name: "pixels" data_type: TYPE_FP32 dims: [ 1, 3, {SIZE}, {SIZE} ] }} ]
"""
CNN_CONFIG = f"""
max_batch_size: 8
input [ {{ name: "pixels" data_type: TYPE_FP32 dims: [ 3, {SIZE}, {SIZE} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {CLASSES} ] label_filename: "labels.txt" }} ]
dynamic_batching {{ }}
"""
TOKENIZER_CONFIG = """
max_batch_size: 0
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] } ]
"""
ENCODER_CONFIG = f"""
max_batch_size: 0
input [ {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 1, {len(SENTIMENTS)} ] label_filename: "labels.txt" }} ]
"""
IMAGE_ENSEMBLE = f"""
platform: "ensemble"
max_batch_size: 0
input [ {{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1 ] }} ]
output [ {{ name: "CLASSES" data_type: TYPE_FP32 dims: [ 1, {CLASSES} ] }} ]
ensemble_scheduling {{
  step [
    {{ model_name: "image_preprocess" model_version: -1
      input_map {{ key: "jpeg" value: "IMAGE" }} output_map {{ key: "pixels" value: "pixels" }} }},
    {{ model_name: "image_classifier" model_version: -1
      input_map {{ key: "pixels" value: "pixels" }} output_map {{ key: "logits" value: "CLASSES" }} }}
  ]
}}
"""
TEXT_ENSEMBLE = f"""
platform: "ensemble"
max_batch_size: 0
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "SENTIMENT" data_type: TYPE_FP32 dims: [ 1, {len(SENTIMENTS)} ] }} ]
ensemble_scheduling {{
  step [
    {{ model_name: "tokenizer" model_version: -1
      input_map {{ key: "text" value: "TEXT" }} output_map {{ key: "input_ids" value: "ids" }} }},
    {{ model_name: "text_encoder" model_version: -1
      input_map {{ key: "input_ids" value: "ids" }} output_map {{ key: "logits" value: "SENTIMENT" }} }}
  ]
}}
"""


def write_ensemble(repo: Path, name: str, config: str) -> Path:
    """An ensemble in Triton's layout: its config and an empty version folder."""
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    return repo / name


def write_image_pipeline(repo: Path) -> None:
    """image_preprocess + image_classifier (with labels) + the image_pipeline ensemble."""
    fixtures.write_model(repo, "image_preprocess", image_preprocess(), config=PREPROCESS_CONFIG)
    fixtures.write_model(repo, "image_classifier", small_cnn(), config=CNN_CONFIG)
    (repo / "image_classifier" / "labels.txt").write_text("\n".join(IMAGE_LABELS) + "\n")
    write_ensemble(repo, "image_pipeline", IMAGE_ENSEMBLE)


def write_text_pipeline(repo: Path) -> None:
    """tokenizer + text_encoder (with labels) + the text_pipeline ensemble."""
    fixtures.write_model(repo, "tokenizer", bert_tokenizer(), config=TOKENIZER_CONFIG)
    fixtures.write_model(repo, "text_encoder", tiny_encoder(), config=ENCODER_CONFIG)
    (repo / "text_encoder" / "labels.txt").write_text("\n".join(SENTIMENTS) + "\n")
    write_ensemble(repo, "text_pipeline", TEXT_ENSEMBLE)


def jpeg_bytes(seed: int, height: int = 48, width: int = 64) -> bytes:
    """A smooth colour image with a pattern that depends on ``seed``, encoded as JPEG by Pillow."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(0.05, 0.3, 3)
    channels = [127 + 120 * np.sin(freq[c] * (xx + (c + 1) * yy) + phase[c]) for c in range(3)]
    pixels = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
