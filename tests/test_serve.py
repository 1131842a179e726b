"""`twofactor serve` as `make run` starts it (embedded PostgreSQL, default log level), from
start to SIGTERM: what reaches the operator's terminal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import health_status, wait_until

START_WITHIN_SECONDS = 90.0  # a first start runs initdb for the embedded PostgreSQL


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_every_stderr_line_of_a_serve_run_is_one_json_object(tmp_path: Path) -> None:
    """The log promises one JSON object per line on stderr. gRPC's fork handlers used to add a
    raw `fork_posix.cc … skipping fork() handlers` line when pgserver forked pg_ctl at exit
    while a gRPC thread was busy, which calls such as SignIn made happen every time."""
    address = f"127.0.0.1:{_free_port()}"
    env = {
        k: v
        for k, v in os.environ.items()
        # This process imported the service, which set GRPC_ENABLE_FORK_SUPPORT: the server
        # must set it itself.
        if not k.startswith(("TWOFACTOR_", "GRPC_"))
    }
    env |= {"TWOFACTOR_DATA_DIR": str(tmp_path / "data"), "TWOFACTOR_LISTEN_ADDRESS": address}
    stderr_path, stdout_path = tmp_path / "stderr", tmp_path / "stdout"
    with stderr_path.open("wb") as stderr, stdout_path.open("wb") as stdout:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "twofactor_service.cli",
            "serve",
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        async with grpc.aio.insecure_channel(address) as channel:

            async def serving() -> bool:
                assert process.returncode is None, stderr_path.read_text()
                return await health_status(channel) == health_pb2.HealthCheckResponse.SERVING

            await wait_until(serving, within=START_WITHIN_SECONDS, what=f"{address} SERVING")
            stub = pb_grpc.TwoFactorServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SignIn(pb.SignInRequest(username="nobody", password="x" * 12))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    lines = stderr_path.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line on stderr: {line!r}") from None
    assert all(isinstance(r, dict) and {"time", "level", "message"} <= r.keys() for r in records)
    messages = [r["message"] for r in records]
    assert "serving" in messages
    assert messages[-1] == "shutting down"
    # The access log's lines, built without the logging machinery, reach stderr too.
    sign_ins = [r for r in records if r.get("method") == "/twofactor.v1.TwoFactorService/SignIn"]
    assert [(r["logger"], r["code"]) for r in sign_ins] == [
        ("twofactor_service.access", "UNAUTHENTICATED")
    ] * 3
    # The greeting for the person at the terminal goes to stdout.
    assert stdout_path.read_text().startswith(f"TwoFactorService listening on {address}.")
