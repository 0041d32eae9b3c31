"""The server's packages import one way (README, "Architecture"): the edges call the data plane, the data plane
the models, the models the backends and the repository, and everything may use the protocol-neutral request
model and the cross-cutting modules below them. Only the composition root (and the command line that starts it)
sees everything. An import that points up a layer, or sideways between the two edges, fails here by name."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SERVER = ROOT / "server"

# Higher imports lower, never the other way; a package or module imports itself freely.
RANK = {
    "errors": 0,
    "settings": 0,
    "logs": 0,
    "metrics": 0,
    "heap": 0,
    "tracing": 5,  # its trace settings raise the error vocabulary's InvalidInput
    "__init__": 0,  # ``from server import __version__``
    "protocol": 10,
    "auth": 10,
    "convert": 20,
    "repository": 30,
    "backends": 40,
    "models": 50,
    "dataplane": 60,
    "http": 70,
    "rpc": 70,
    "app": 80,
    "cli": 90,
    "__main__": 100,
}


def layer(module: str) -> str:
    """The layer of ``server.<x>[.<y>]``: the package ``x``, or the top-level module ``x``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def server_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``server.*`` module imported anywhere in a file (lazy and TYPE_CHECKING imports included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "server":
                found += [(node.lineno, f"server.{alias.name}") for alias in node.names if alias.name != "__version__"]
                found += [(node.lineno, "server") for alias in node.names if alias.name == "__version__"]
            elif node.module.startswith("server."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("server.")]
    return found


def test_every_server_module_has_a_layer() -> None:
    names = {p.relative_to(SERVER).parts[0].removesuffix(".py") for p in SERVER.glob("*") if p.name != "__pycache__"}
    assert names == set(RANK)


def test_imports_point_down() -> None:
    wrong = []
    for path in sorted(SERVER.rglob("*.py")):
        own = layer("server." + ".".join(path.relative_to(SERVER).with_suffix("").parts))
        for line, module in server_imports(path):
            target = layer(module)
            if target != own and RANK[target] >= RANK[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({own} may not use {target})")
    assert not wrong, "\n".join(wrong)
