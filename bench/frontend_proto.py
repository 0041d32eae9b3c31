"""Prototype of a multi-process gRPC front end, to measure whether it can beat one grpc.aio event loop here.

Usage: python -m bench.frontend_proto --mode bare|engine --procs N --port P [--model model.onnx]

N front-end processes each run a grpc.aio server (uvloop) on the same port with SO_REUSEPORT, so the kernel
spreads connections over them. ``bare``: ModelInfer answers a constant [1,10] FP32 output (the ceiling of
the design: front ends with free hand-off). ``engine``: each front end copies the request's input into its
own slot of a shared-memory block and wakes one engine process by writing the slot number to a socketpair;
the engine takes every slot that is waiting (all front ends: one batch across connections), runs it through
onnxruntime in one call, writes each output back into its slot and wakes the front ends the same way.
Only ModelInfer with one raw FP32 input is served: it is a measurement, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import selectors
import signal
import socket
import struct
import sys
from multiprocessing import shared_memory
from typing import Any

import numpy as np

SLOTS = 64  # per front end: more than the requests one front end can have in flight in a benchmark
MAX_BATCH = 32
_INDEX = struct.Struct("<H")


def _response(pb: Any, request: Any, out: bytes, shape: list[int]) -> Any:
    reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    reply.outputs.add(name="output", datatype="FP32", shape=shape)
    reply.raw_output_contents.append(out)
    return reply


def front_end(port: int, mode: str, conn: socket.socket | None, shm_name: str | None, io: tuple[int, int]) -> None:
    """One front-end process: a grpc.aio server sharing ``port``; in engine mode, slots in shared memory."""
    import grpc
    import uvloop
    from tritonclient.grpc import model_config_pb2, service_pb2_grpc
    from tritonclient.grpc import service_pb2 as pb

    in_bytes, out_bytes = io
    constant = bytes(out_bytes)

    class Service(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.free = list(range(SLOTS))
            self.waiting: dict[int, asyncio.Future[None]] = {}
            self.block = shared_memory.SharedMemory(shm_name) if shm_name else None

        def on_ready(self) -> None:
            assert conn is not None
            data = conn.recv(2 * SLOTS * 8)
            for (slot,) in _INDEX.iter_unpack(data):
                self.waiting.pop(slot).set_result(None)

        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            return pb.ServerMetadataResponse(name="frontend-prototype", version="0")

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=["1"],
                platform="onnxruntime_onnx",
                inputs=[tensor(name="input", datatype="FP32", shape=[-1, in_bytes // 4])],
                outputs=[tensor(name="output", datatype="FP32", shape=[-1, out_bytes // 4])],
            )

        async def ModelConfig(self, request: Any, context: Any) -> Any:
            config = model_config_pb2.ModelConfig(name=request.name, max_batch_size=MAX_BATCH)
            config.input.add(name="input", data_type=model_config_pb2.TYPE_FP32, dims=[in_bytes // 4])
            config.output.add(name="output", data_type=model_config_pb2.TYPE_FP32, dims=[out_bytes // 4])
            return pb.ModelConfigResponse(config=config)

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            if mode == "bare":
                return _response(pb, request, constant, [1, out_bytes // 4])
            assert self.block is not None and conn is not None
            slot = self.free.pop()
            base = slot * (in_bytes + out_bytes)
            self.block.buf[base : base + in_bytes] = request.raw_input_contents[0]
            done = asyncio.get_running_loop().create_future()
            self.waiting[slot] = done
            conn.send(_INDEX.pack(slot))
            await done
            out = bytes(self.block.buf[base + in_bytes : base + in_bytes + out_bytes])
            self.free.append(slot)
            return _response(pb, request, out, [1, out_bytes // 4])

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        service = Service()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        if conn is not None:
            conn.setblocking(False)
            asyncio.get_running_loop().add_reader(conn.fileno(), service.on_ready)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    uvloop.run(serve())


def engine(model: str, conns: list[socket.socket], shm_names: list[str], io: tuple[int, int]) -> None:
    """The engine process: gathers waiting slots from every front end into one batch, runs it, answers."""
    import onnxruntime as ort

    in_bytes, out_bytes = io
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    features = in_bytes // 4
    blocks = [shared_memory.SharedMemory(n) for n in shm_names]
    views = [np.ndarray((SLOTS, in_bytes + out_bytes), np.uint8, b.buf) for b in blocks]
    selector = selectors.DefaultSelector()
    for index, conn in enumerate(conns):
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ, index)
    pending: list[tuple[int, int]] = []
    while True:
        timeout = 0 if pending else None
        for key, _ in selector.select(timeout):
            try:
                data = key.fileobj.recv(2 * SLOTS * 8)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if not data:
                return
            pending += [(key.data, slot) for (slot,) in _INDEX.iter_unpack(data)]
        batch, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
        if not batch:
            continue
        x = np.stack([views[f][s, :in_bytes] for f, s in batch]).view(np.float32).reshape(len(batch), features)
        out = session.run(None, {name: x})[0].astype(np.float32, copy=False)
        replies: dict[int, bytearray] = {}
        for row, (f, s) in enumerate(batch):
            views[f][s, in_bytes:] = out[row].view(np.uint8)
            replies.setdefault(f, bytearray()).extend(_INDEX.pack(s))
        for f, payload in replies.items():
            conns[f].sendall(payload)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontend_proto", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("bare", "engine"), required=True)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", help="ONNX file with one FP32 input [batch, F] and output [batch, K]")
    parser.add_argument("--in-bytes", type=int, default=256 * 4)
    parser.add_argument("--out-bytes", type=int, default=10 * 4)
    args = parser.parse_args(argv)
    io = (args.in_bytes, args.out_bytes)
    ctx = mp.get_context("spawn")
    blocks, ours, theirs = [], [], []
    if args.mode == "engine":
        for _ in range(args.procs):
            blocks.append(shared_memory.SharedMemory(create=True, size=SLOTS * sum(io)))
            a, b = socket.socketpair()
            ours.append(a)
            theirs.append(b)
    procs = [
        ctx.Process(
            target=front_end,
            args=(args.port, args.mode, theirs[i] if theirs else None, blocks[i].name if blocks else None, io),
        )
        for i in range(args.procs)
    ]
    for proc in procs:
        proc.start()
    for end in theirs:  # the front ends hold these now; closing ours lets the engine see them exit
        end.close()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        if args.mode == "engine":
            engine(args.model, ours, [b.name for b in blocks], io)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            proc.terminate()
        for block in blocks:
            block.close()
            block.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
