"""The server as the composition root builds it (server.app.OptiServe), in this event loop: models loaded, the
HTTP edge as the ASGI app uvicorn would run (inference endpoint in front of FastAPI), gRPC on port 0."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from server.app import OptiServe
from server.settings import Settings


@contextlib.asynccontextmanager
async def serving(repo: Path, tmp: Path) -> AsyncIterator[tuple[OptiServe, int]]:
    """The server and its gRPC port; stopped and its models closed on exit."""
    server = OptiServe(Settings(model_repository=repo, default_precision="none", cache_dir=tmp / "cache"))
    await server.models.load_all()
    port = server.grpc_server.add_insecure_port("127.0.0.1:0")
    await server.grpc_server.start()
    try:
        yield server, port
    finally:
        await server.grpc_server.stop(0)
        await server.models.close(1)
