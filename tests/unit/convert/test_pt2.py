"""server.convert.pt2: the static checks of a torch.export archive. A clean archive passes; every way that
torch.export.load (2.13) could run code from the file is refused before PyTorch reads it. The control test
shows the risk is real: torch.export.load on the original runs the sample-inputs pickle, our converter never
does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.convert.job import Job
from server.convert.pt2 import check_expression, check_pt2, check_target
from server.errors import UnsupportedMediaType
from tests.models import frameworks

torch = pytest.importorskip("torch", reason="needs the torch extra (make test installs it)")


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    frameworks.save_pt2(path)
    return path


def _copy(clean: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    path.write_bytes(clean.read_bytes())
    return path


def test_a_plain_export_passes(clean_pt2: Path) -> None:
    archive = check_pt2(clean_pt2, "model.pt2")
    assert any(name.endswith("models/model.json") for name in archive.names)


def _pickled_weight(config: Any) -> None:
    next(iter(config["config"].values()))["use_pickle"] = True


def _opaque_constant(config: Any) -> None:
    config["config"]["c"] = {"path_name": "opaque_obj_0", "use_pickle": False}


def _guards(program: Any) -> None:
    program["guards_code"] = ["__import__('os').system('id')"]


def _evil_target(program: Any) -> None:
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


def _evil_expression(program: Any) -> None:
    program["graph_module"]["graph"]["sym_int_values"] = {
        "s0": {"as_expr": {"expr_str": "__import__('os').system('id')", "hint": None}}
    }


@pytest.mark.parametrize(
    ("member", "change", "extra"),
    [
        ("data/weights/model_weights_config.json", _pickled_weight, None),
        ("data/constants/model_constants_config.json", _opaque_constant, None),
        ("models/model.json", _guards, None),
        ("models/model.json", _evil_target, None),
        ("models/model.json", _evil_expression, None),
        ("", None, {"data/aotinductor/model/model.so": b"\x7fELF"}),
        ("", None, {"data/weights/model.pt": b"\x80\x04"}),
        ("", None, {"extra/module_info.json": b"{}"}),
        ("", None, {"serialized_exported_program.json": b"{}"}),
    ],
)
def test_code_bearing_archives_are_refused(
    clean_pt2: Path, tmp_path: Path, member: str, change: Any, extra: dict[str, bytes] | None
) -> None:
    path = _copy(clean_pt2, tmp_path)
    edit = frameworks.edit_json(member, change) if change else (lambda _tail, data: data)
    frameworks.rewrite_zip(path, edit, extra)
    with pytest.raises(UnsupportedMediaType, match="optiserve convert"):
        check_pt2(path, "model.pt2")


@pytest.mark.parametrize(
    "text",
    ["Symbol('s77', positive=True, integer=True)", "2*s0 + 1", "FloorDiv(s0, 2)", "Max(1, s12)", "s0 // 4 - 3"],
)
def test_plain_shape_expressions_pass(text: str) -> None:
    check_expression(text, "m")


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('id')",
        "s0.__class__",
        "Symbol('s0').func",
        "eval('1')",
        "lambda: 1",
        "[x for x in ()]",
        "Symbol('__x')",
        "1e5",
    ],
)
def test_other_expressions_are_refused(text: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_expression(text, "m")


@pytest.mark.parametrize("target", ["torch.ops.aten.conv2d.default", "_operator.getitem", "math.ceil"])
def test_operator_targets_pass(target: str) -> None:
    check_target(target, "m")


@pytest.mark.parametrize(
    "target",
    ["torch.os.system", "torch.ops.aten.__class__", "_operator.attrgetter", "builtins.eval", "torch.load", "#ext"],
)
def test_other_targets_are_refused(target: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_target(target, "m")


def test_the_sample_inputs_pickle_is_never_read(clean_pt2: Path, tmp_path: Path) -> None:
    """torch.export.load runs the archive's sample-inputs pickle (weights_only=True, then a fallback to a full
    unpickle). A hostile one creates a marker under plain torch.export.load; our converter never reads it."""
    path = _copy(clean_pt2, tmp_path)
    marker = tmp_path / "marker"
    payload = frameworks.marker_pickle(marker)
    frameworks.rewrite_zip(path, lambda tail, data: payload if tail == "data/sample_inputs/model.pt" else data)
    check_pt2(path, "model.pt2")  # the sample inputs are allowed: they are replaced, never read
    work = tmp_path / "work"
    work.mkdir()
    from server.convert import torch_export

    job = Job("torch", str(path), str(work))
    produced = torch_export.produce(job)
    assert produced.outputs and job.onnx_path.is_file()
    assert not marker.exists()
    # The control: PyTorch's own loader unpickles it (in a child process, so this one stays clean).
    code = f"import torch; torch.export.load({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    assert marker.exists(), "torch.export.load no longer runs the sample-inputs pickle: revisit server/convert/pt2.py"
