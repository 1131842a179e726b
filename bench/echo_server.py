"""The framework's ceiling: a bare grpc.aio server (on uvloop, as `twofactor serve` runs) whose
one unary RPC parses a VerifyCodeRequest and sends it back. No interceptors, no database.

`--workers N` runs N such processes on one port with SO_REUSEPORT, as `twofactor serve
--workers N` does. Prints "ready" on stdout once every process listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from typing import Any

import grpc
from twofactor.v1 import twofactor_service_pb2 as pb


async def echo(request: pb.VerifyCodeRequest, context: Any) -> pb.VerifyCodeRequest:
    return request


async def serve(port: int, reuse_port: bool) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    handler = grpc.method_handlers_generic_handler(
        "bench.v1.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=pb.VerifyCodeRequest.FromString,
                response_serializer=pb.VerifyCodeRequest.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on port {port}")
    await server.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def run_workers(port: int, workers: int) -> None:
    command = [sys.executable, __file__, "--port", str(port), "--reuse-port"]
    children = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: S603 - our own script
        for _ in range(workers)
    ]
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("an echo worker did not start")
    print("ready", flush=True)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args()
    if args.workers > 1:
        run_workers(args.port, args.workers)
        return
    import uvloop

    uvloop.run(serve(args.port, args.reuse_port))


if __name__ == "__main__":
    main()
