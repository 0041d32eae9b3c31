"""GRPCInferenceService and grpc.health.v1 handlers: decode, call the DataPlane, encode."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.auth import AccessPolicy, Scope, grpc_peer_host
from server.dataplane import DataPlane
from server.errors import InternalError, InvalidInput, ServerError, wire_status
from server.protocol import tensors
from server.protocol.shared_memory import SharedMemoryRegistry
from server.rpc.codec import decode_request, encode_response, from_json, parameter_value
from server.rpc.wire import add_inference_service
from server.settings import Settings
from server.tracing import Tracer

T = TypeVar("T")
_END_OF_STREAM = object()
Handler = Callable[..., Awaitable[T]]


def translate_errors(handler: Handler[T]) -> Handler[T]:
    """Turn ServerError (and anything unexpected) into a gRPC status from the one error table."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await handler(self, request, context)
        except ServerError as exc:
            await _abort(context, exc)
        except Exception as exc:  # never leak a traceback to the client, never die
            await _abort(context, InternalError(f"internal error: {type(exc).__name__}: {exc}"))
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, error: ServerError) -> None:
    if error.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(error.retry_after_s)))),))
    await context.abort(wire_status(error).grpc_code, error.message)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's GRPCInferenceService over one DataPlane. Unlisted RPCs answer UNIMPLEMENTED."""

    def __init__(
        self,
        dataplane: DataPlane,
        limits: tensors.Limits,
        access: AccessPolicy,
        regions: SharedMemoryRegistry | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.tracer = tracer or Tracer()
        self.limits = limits
        self.access = access
        self.regions = regions if regions is not None else SharedMemoryRegistry(enabled=False)

    def _authorize(self, context: Any, scope: Scope) -> None:
        """The one access policy, fed the ``authorization`` metadata and the peer address."""
        if self.access.guards(scope):
            self.access.check(scope, _metadata(context).get("authorization"), grpc_peer_host(context.peer()))

    @translate_errors
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @translate_errors
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @translate_errors
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @translate_errors
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return from_json(self.dataplane.server_metadata(), pb.ServerMetadataResponse())

    @translate_errors
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.INFERENCE)
        await self.dataplane.resident(request.name, request.version)  # --load-on-demand loads it
        return from_json(self.dataplane.model_metadata(request.name, request.version), pb.ModelMetadataResponse())

    @translate_errors
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.INFERENCE)
        await self.dataplane.resident(request.name, request.version)  # --load-on-demand loads it
        return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))

    @translate_errors
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.INFERENCE)
        return from_json(self.dataplane.statistics(request.name, request.version), pb.ModelStatisticsResponse())

    @translate_errors
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if not self.tracer.enabled:
            return await self._infer(request, context)
        with self.tracer.request("grpc", request.model_name, request.model_version, _metadata(context)):
            return await self._infer(request, context)

    async def _infer(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.INFERENCE)
        return await self._run(request)

    async def _run(self, request: Any) -> Any:
        """Decode, infer through the data plane, encode: one ModelInferRequest, unary or from a stream."""
        with self.dataplane.inference(request.model_name, request.model_version) as call:
            decoded = decode_request(request, self.limits, self.regions)
            return encode_response(await call.infer(decoded), decoded, self.regions)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        """Triton's bidirectional stream: every request is served concurrently (so a stream's requests
        batch together) and answered as soon as it is done, matched by ``id``. A failed request gets an
        ``error_message`` reply and the stream goes on, as Triton does. One call for many requests also
        saves grpc.aio's per-call cost, its largest one here."""
        try:
            self._authorize(context, Scope.INFERENCE)
        except ServerError as exc:
            await _abort(context, exc)
        replies: asyncio.Queue[Any] = asyncio.Queue()
        # Tracing: every request of the stream gets its own span, all under the stream's ``traceparent``.
        metadata = _metadata(context) if self.tracer.enabled else None
        reader = asyncio.ensure_future(self._read_stream(request_iterator, replies, metadata))
        try:
            while (reply := await replies.get()) is not _END_OF_STREAM:
                yield reply
        finally:
            reader.cancel()

    async def _read_stream(
        self, request_iterator: Any, replies: asyncio.Queue[Any], metadata: dict[str, str] | None
    ) -> None:
        running: set[asyncio.Task[None]] = set()

        async def serve(request: Any) -> None:
            await replies.put(await self._stream_reply(request, metadata))

        async for request in request_iterator:
            task = asyncio.ensure_future(serve(request))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)
        await replies.put(_END_OF_STREAM)

    async def _stream_reply(self, request: Any, metadata: dict[str, str] | None) -> Any:
        """One stream request's reply; traced (its own task, so CURRENT is its own) when ``metadata`` is given."""
        try:
            if metadata is None:
                response = await self._run(request)
            else:
                with self.tracer.request("grpc", request.model_name, request.model_version, metadata):
                    response = await self._run(request)
            return pb.ModelStreamInferResponse(infer_response=response)
        except Exception as exc:  # reported in-stream; one bad request must not end the stream
            error = exc if isinstance(exc, ServerError) else InternalError(f"internal error: {exc}")
            failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version)
            failed.id = request.id
            return pb.ModelStreamInferResponse(error_message=error.message, infer_response=failed)

    @translate_errors
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.INFERENCE)
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self.regions.status(request.name):
            reply.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return reply

    @translate_errors
    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.ADMIN)
        self.regions.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @translate_errors
    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.ADMIN)
        self.regions.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # CUDA shared memory is not served; answering status and unregister (there is nothing to unregister) lets
    # clients that clear both kinds at start and exit, as perf_analyzer does, use system shared memory.
    @translate_errors
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            raise InvalidInput(f"name: CUDA shared memory region {request.name!r} is not registered")
        return pb.CudaSharedMemoryStatusResponse()

    @translate_errors
    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise InvalidInput("CUDA shared memory is not supported by this server; use system shared memory")

    @translate_errors
    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.ADMIN)
        return pb.CudaSharedMemoryUnregisterResponse()

    @translate_errors
    async def TraceSetting(self, request: Any, context: Any) -> Any:
        """Triton's trace extension (server/tracing/control.py): no settings reads them, settings change them
        (admin scope); an empty value clears a model's own setting."""
        changes = {key: list(value.value) for key, value in request.settings.items()}
        self._authorize(context, Scope.ADMIN if changes else Scope.INFERENCE)
        model = request.model_name or None
        if model is not None:
            self.dataplane.require_model(model)
        control = self.tracer.control
        settings = control.update(model, changes) if changes else control.settings(model)
        reply = pb.TraceSettingResponse()
        for key, value in settings.items():
            reply.settings[key].value.extend(value if isinstance(value, list) else [value])
        return reply

    @translate_errors
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.INFERENCE)
        rows = self.dataplane.repository_index(request.ready)
        fields = ("name", "version", "state", "reason")  # the HTTP rows carry more (memory_bytes)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**{k: row[k] for k in fields}) for row in rows]
        )

    @translate_errors
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.ADMIN)
        parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidInput("parameters.config: must be a string_param holding JSON")
        await self.dataplane.load_model(request.model_name, config, _file_parameters(parameters))
        return pb.RepositoryModelLoadResponse()

    @translate_errors
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        self._authorize(context, Scope.ADMIN)
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _metadata(context: Any) -> dict[str, str]:
    """The call's metadata with lower-case keys (gRPC already lower-cases them; be sure), for ``traceparent``."""
    return {key.lower(): value for key, value in context.invocation_metadata() or ()}


def _file_parameters(parameters: dict[str, Any]) -> dict[str, bytes]:
    """Triton's ``file:<version>/<name>`` load parameters (bytes_param), keyed without the prefix."""
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key.startswith("file:"):
            if not isinstance(value, bytes):
                raise InvalidInput(f"parameters[{key!r}]: model files must be sent as bytes_param")
            files[key.removeprefix("file:")] = value
    return files


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1: service "" is the server's readiness, a model name is that model's readiness."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def _status(self, service: str) -> Any:
        ready = self.dataplane.ready() if not service else self.dataplane.model_ready(service)
        serving = health_pb2.HealthCheckResponse.SERVING
        return serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=self._status(request.service))

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(0.5)


def create_grpc_server(
    dataplane: DataPlane,
    settings: Settings,
    limits: tensors.Limits,
    access: AccessPolicy,
    regions: SharedMemoryRegistry | None = None,
    tracer: Tracer | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with both services, the configured message size limits, and the tensor limits, access
    policy and shared-memory registry shared with the HTTP edge."""
    limit = settings.max_grpc_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    # Large ModelInfer requests keep their tensors in the received buffer (server/rpc/wire.py).
    add_inference_service(InferenceService(dataplane, limits, access, regions, tracer), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(dataplane), server)
    return server
