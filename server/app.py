"""The composition root: builds repository, model manager, data plane, HTTP and gRPC servers, and runs
them on one event loop. Nothing else wires components together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import start_http_server

from server.auth import AccessPolicy
from server.dataplane import DataPlane
from server.heap import HeapKeeper
from server.http.app import create_http_app
from server.http.fast import InferFastPath
from server.http.protocol import bounded_headers_protocol
from server.logs import configure_logging
from server.metrics import ServerMetrics, optimizer_cache_families
from server.models.manager import ModelManager
from server.models.response_cache import ResponseCache
from server.protocol import tensors
from server.protocol.shared_memory import SharedMemoryRegistry
from server.repository.layout import Repository
from server.repository.replicas import Fleet, default_replica_id
from server.rpc.service import create_grpc_server
from server.settings import Settings
from server.tracing import Tracer

log = logging.getLogger("optiserve")


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the composition root owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OptiServe:
    """One server process: everything it serves and how it starts and stops."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository = Repository(settings.model_repository)
        self.metrics = ServerMetrics(enabled=settings.metrics)
        self.response_cache = ResponseCache(settings.response_cache_bytes)
        self.models = ModelManager(self.repository, settings, self.metrics, self.response_cache)
        self.metrics.add_state_collector(self.response_cache.metric_families)
        self.metrics.add_state_collector(self.models.metric_families)
        # Replicas on one repository: this one's heartbeat (poll mode) and the fleet's view (repository/replicas.py).
        self.fleet = Fleet(
            self.repository.root,
            settings.replica_id or default_replica_id(),
            settings.repository_poll_secs,
            served=lambda: [(v.name, int(v.version), v.variant) for v in self.models.served_versions()],
            ready=self.models.server_ready,
            heartbeats=settings.model_control_mode == "poll",
        )
        self.metrics.add_state_collector(self.fleet.metric_families)
        self.metrics.add_state_collector(lambda: optimizer_cache_families(self.models.loader.pipeline().cache_counts()))
        self.dataplane = DataPlane(self.models)
        # OpenTelemetry request tracing (server/tracing/): off unless --tracing or OTEL_TRACES_EXPORTER.
        self.tracer = Tracer.from_environment(settings.tracing)
        # Both edges decode under the same limits and ask the same access policy.
        limits = tensors.Limits(settings.max_tensor_elements, settings.max_tensor_rank, settings.max_inputs)
        access = AccessPolicy.from_settings(settings)
        registry = self.metrics.registry if settings.metrics else None
        # One set of client shared-memory regions, registered and used through either edge.
        self.shared_memory = SharedMemoryRegistry(settings.allow_client_shm, settings.max_shm_regions)
        self.http_app = create_http_app(
            self.dataplane, settings, access, registry, self.shared_memory, self.fleet, self.tracer
        )
        # Inference is served in front of FastAPI, skipping its middleware and routing (server/http/fast.py).
        self.asgi_app = InferFastPath(
            self.http_app, self.dataplane, settings.max_request_bytes, limits, access, self.shared_memory, self.tracer
        )
        self.grpc_server = create_grpc_server(self.dataplane, settings, limits, access, self.shared_memory, self.tracer)
        self._stop = asyncio.Event()
        self.http_port = 0
        self.grpc_port = 0

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""
        settings = self.settings
        self.dataplane.recover_uploads()  # before anything reads the repository or can upload to it
        http_socket = _bind(settings.host, settings.http_port)
        self.http_port = http_socket.getsockname()[1]
        self.grpc_port = self.grpc_server.add_insecure_port(f"{_grpc_host(settings.host)}:{settings.grpc_port}")
        if settings.grpc_port and self.grpc_port != settings.grpc_port:
            raise OSError(f"gRPC port {settings.grpc_port} on {settings.host} is not available")
        await self.grpc_server.start()
        http_server = _UvicornServer(
            uvicorn.Config(
                self.asgi_app,
                http=bounded_headers_protocol(settings.max_header_bytes, settings.header_timeout_s),
                log_level=settings.log_level,
                access_log=settings.access_log,
                lifespan="off",
                log_config=None,
                timeout_graceful_shutdown=int(settings.exit_timeout_s) + 2,
                timeout_keep_alive=30,
            )
        )
        if settings.metrics and settings.metrics_port is not None:
            start_http_server(settings.metrics_port, addr=settings.host, registry=self.metrics.registry)
        self._install_signal_handlers()
        log.info(
            "listening: http=%s:%d grpc=%s:%d repository=%s",
            settings.host,
            self.http_port,
            settings.host,
            self.grpc_port,
            self.repository.root,
        )
        # In poll mode the same task goes on rescanning the repository; the drain cancels it.
        loading = asyncio.create_task(self._load_and_poll())
        serving = asyncio.create_task(http_server.serve(sockets=[http_socket]))
        # Ends (removing this replica's heartbeat) as soon as the drain begins.
        beating = asyncio.create_task(self.fleet.run(self._stop)) if self.fleet.heartbeats else None
        keeping = asyncio.create_task(self._keep_heap()) if settings.gc_freeze else None
        await self._stop.wait()
        await self._shutdown(http_server, serving, loading)
        if beating is not None:
            await beating
        if keeping is not None:
            await keeping

    async def _keep_heap(self) -> None:
        """The served versions' heap frozen out of full collections (server/heap.py), from the first load on."""

        def served() -> frozenset[tuple[str, int, int]]:
            return frozenset((v.name, v.version, id(v)) for v in self.models.served_versions())

        await HeapKeeper(served).run(self._stop)

    async def _load_and_poll(self) -> None:
        """Load every model, then (--model-control-mode poll) rescan the repository every
        --repository-poll-secs until the drain begins."""
        await self.models.load_all()
        if self.settings.model_control_mode != "poll":
            return
        while not self._stop.is_set():
            await asyncio.sleep(self.settings.repository_poll_secs)
            if self._stop.is_set():
                return
            try:
                await self.models.poll()
            except Exception:  # a poll that fails (a vanished folder, a full disk) is retried next time
                log.exception("polling the model repository failed")

    def request_stop(self) -> None:
        """Begin a graceful drain (signal handler)."""
        if not self._stop.is_set():
            log.info("shutting down: readiness off, draining for up to %.0fs", self.settings.exit_timeout_s)
            self.models.drain()
            self._stop.set()

    async def _shutdown(
        self, http_server: uvicorn.Server, serving: asyncio.Task[None], loading: asyncio.Task[None]
    ) -> None:
        """Drain: listeners close at once, accepted requests finish until the deadline; whatever is still
        queued then gets 503 (not a dropped connection), and the process exits 0."""
        loop = asyncio.get_running_loop()
        grace = self.settings.exit_timeout_s
        deadline = loop.time() + grace
        http_server.should_exit = True
        grpc_stopped = asyncio.ensure_future(self.grpc_server.stop(grace + 2))
        loading.cancel()
        while self.models.pending() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.models.close(timeout_s=max(0.0, deadline - loop.time()))
        await asyncio.gather(grpc_stopped, serving, return_exceptions=True)
        self.shared_memory.close()  # unmaps the clients' segments; they stay, they are the clients'
        self.tracer.shutdown()  # flushes the spans still buffered
        log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(settings: Settings) -> None:
    """Run the server in this process until it is told to stop."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # uvloop is optional (uvicorn[standard] brings it on Linux/macOS)
        asyncio.run(_run(settings))
    else:
        uvloop.run(_run(settings))


async def _run(settings: Settings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop current at creation.
    await OptiServe(settings).run()
