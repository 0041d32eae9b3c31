"""Static checks of a torch.export archive (``model.pt2``) before any PyTorch code reads it.

``torch.export.load`` (PyTorch 2.13) is not safe on untrusted files, and its own docstring says so. It runs
``torch.load(weights_only=False)`` on payloads marked ``use_pickle`` and, as a fallback, on the sample inputs;
``pickle.loads`` on opaque constants; the TorchScript unpickler on custom objects; ``dlopen`` on AOTInductor
libraries; ``sympy.sympify`` (an ``eval``) on symbolic-shape strings; ``exec`` on ``guards_code``; and
resolves node targets by ``getattr`` from the ``torch``, ``operator`` and ``math`` modules. We accept an
archive only when none of that can happen:

- every member is on an allowlist of the archive layout (no AOTInductor, ExecuTorch, extra or legacy files);
- weights and constants are raw tensor bytes (``use_pickle`` false, ``tensor_*`` constants only);
- ``guards_code`` is empty, every ``expr_str`` is plain integer arithmetic on shape symbols, and every node
  target is an ``aten``/``prims`` operator or an allowlisted ``operator``/``math`` function;
- the sample-inputs pickle is never read: the converter replaces it with its own before loading.

These checks need no PyTorch, so the server runs them at upload; the converter runs them again.
"""

from __future__ import annotations

import io
import json
import re
import tokenize
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.convert.archive import check_zip
from server.errors import InvalidInput, UnsupportedMediaType

MAX_JSON_BYTES = 256 * 2**20
_ALLOWED = [
    re.compile(pattern)
    for pattern in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"\.data/version",
        r"\.data/serialization_id",
        r"models/model\.json",
        r"data/weights/model_weights_config\.json",
        r"data/weights/weight_[0-9]+",
        r"data/constants/model_constants_config\.json",
        r"data/constants/tensor_[0-9]+",
        r"data/sample_inputs/model\.pt",
    )
]
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_OPERATOR_NAMES = frozenset(
    [
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
    ]
)
_MATH_NAMES = frozenset(["ceil", "floor", "trunc", "sqrt", "exp", "log"])
_TORCH_OP = re.compile(r"torch\.ops\.(aten|prims)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
#: Names an ``expr_str`` may use: sympy constructors and the shape functions torch's deserializer provides.
_EXPR_NAMES = frozenset(
    [
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "true",
        "false",
        "True",
        "False",
        "positive",
        "integer",
        "nonnegative",
        "negative",
        "real",
        "finite",
        "Max",
        "Min",
        "Abs",
        "Mod",
        "FloorDiv",
        "CleanDiv",
        "CeilDiv",
        "CeilToInt",
        "FloorToInt",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "IntTrueDiv",
        "FloatTrueDiv",
        "ToFloat",
        "TruncToInt",
        "TruncToFloat",
        "RoundToInt",
        "RoundDecimal",
        "PowByNatural",
        "FloatPow",
        "Identity",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
    ]
)
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_EXPR_OPS = frozenset(
    ["+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "=", "==", "!=", "<", "<=", ">", ">=", "&", "|"]
)


@dataclass(frozen=True)
class Pt2Archive:
    """What the checks learned: the archive's root folder and its member names."""

    root: str
    names: tuple[str, ...]


def check_pt2(path: Path, label: str) -> Pt2Archive:
    """Raise (415 or 400, with the reason) unless the archive can be loaded without running its code."""
    names = check_zip(path, label)
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise InvalidInput(f"{label}: a torch.export archive has all its members in one top folder")
    root = roots.pop()
    for name in names:
        tail = name.split("/", 1)[1]
        if tail and not name.endswith("/") and not any(p.fullmatch(tail) for p in _ALLOWED):
            raise _refuse(label, f"member {tail!r} is not part of a plain torch.export archive")
    with zipfile.ZipFile(path) as archive:
        _check_marker(archive, f"{root}/archive_format", b"pt2", label)
        _check_payloads(_read_json(archive, f"{root}/data/weights/model_weights_config.json", label), "weight_", label)
        _check_payloads(
            _read_json(archive, f"{root}/data/constants/model_constants_config.json", label), "tensor_", label
        )
        check_program(_read_json(archive, f"{root}/models/model.json", label), label)
    return Pt2Archive(root, tuple(names))


def check_program(program: Any, label: str) -> None:
    """The serialized ExportedProgram: no guards code, plain shape expressions, allowlisted node targets."""
    if not isinstance(program, dict):
        raise InvalidInput(f"{label}: models/model.json is not an object")
    if program.get("guards_code"):
        raise _refuse(label, "it carries guards_code (Python source that loading would run)")
    for key, value in _walk(program):
        if key == "expr_str":
            check_expression(value, label)
        elif key == "target":
            check_target(value, label)


def check_expression(text: Any, label: str) -> None:
    """A symbolic-shape string, which torch hands to ``sympy.sympify`` (an ``eval``): only integers, shape
    symbols, a few sympy constructors and arithmetic; no attribute access, no dunders, no other names."""
    if not isinstance(text, str) or len(text) > 4096:
        raise _refuse(label, "a shape expression is not a short string")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        raise _refuse(label, f"shape expression {text[:80]!r} does not parse") from None
    for token in tokens:
        if not _allowed_token(token):
            raise _refuse(label, f"shape expression {text[:80]!r} uses {token.string!r}")


def _allowed_token(token: tokenize.TokenInfo) -> bool:
    if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
        return token.type != tokenize.NUMBER or token.string.isdigit()
    if token.type == tokenize.NAME:
        return token.string in _EXPR_NAMES or bool(_SYMBOL.fullmatch(token.string))
    if token.type == tokenize.STRING:
        return bool(re.fullmatch(r"'[a-z]{1,4}[0-9]{1,9}'", token.string))
    return token.type == tokenize.OP and token.string in _EXPR_OPS


def check_target(target: Any, label: str) -> None:
    """A node target: ``torch.ops.aten|prims.<op>.<overload>``, or an allowlisted ``_operator``/``math``
    function (torch resolves them with ``getattr`` from those modules)."""
    if not isinstance(target, str):
        raise _refuse(label, "a node target is not a string")
    if "__" in target:
        raise _refuse(label, f"node target {target[:80]!r} is not an allowed operator")
    module, _, name = target.partition(".")
    if module == "_operator" and name in _OPERATOR_NAMES:
        return
    if module == "math" and name in _MATH_NAMES:
        return
    if not _TORCH_OP.fullmatch(target):
        raise _refuse(label, f"node target {target[:80]!r} is not an aten/prims operator")


def _check_payloads(config: Any, prefix: str, label: str) -> None:
    """Weights and constants must be raw tensor bytes: nothing pickled, no custom or opaque objects."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise InvalidInput(f"{label}: a payload config has no 'config' object")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise InvalidInput(f"{label}: payload {fqn!r} is not described")
        if meta.get("use_pickle") is not False:
            raise _refuse(label, f"payload {fqn!r} is pickled")
        if not re.fullmatch(rf"{prefix}[0-9]+", str(meta.get("path_name", ""))):
            raise _refuse(label, f"payload {fqn!r} is not a plain tensor ({meta.get('path_name')!r})")


def _read_json(archive: zipfile.ZipFile, name: str, label: str) -> Any:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise InvalidInput(f"{label}: {name.split('/', 1)[1]} is missing from the torch.export archive") from None
    if info.file_size > MAX_JSON_BYTES:
        raise InvalidInput(f"{label}: {name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(archive.read(info))
    except ValueError as exc:
        raise InvalidInput(f"{label}: {name.split('/', 1)[1]} is not JSON ({exc})") from None


def _check_marker(archive: zipfile.ZipFile, name: str, expected: bytes, label: str) -> None:
    try:
        value = archive.read(name).strip()
    except KeyError:
        value = b""
    if value != expected:
        raise InvalidInput(f"{label}: not a torch.export archive ({name.split('/', 1)[1]} != {expected.decode()})")


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first, without recursion limits."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield key, child
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _refuse(label: str, why: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"{label}: {why}; loading such a torch.export archive can run code, so the server refuses it. "
        "Export with torch.export.export + torch.export.save (no custom objects, no AOTInductor), or convert "
        "it on your own machine with `optiserve convert model.pt2 -o model.onnx`"
    )
