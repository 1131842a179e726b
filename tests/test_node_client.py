"""Another language's stock gRPC library drives the service (SPEC §3, "Clients"): the Node.js
client in clients/node, on @grpc/grpc-js with the protos loaded at run time, signs an allowlisted
account in, sets up its key, signs in again with a code, and has a service account verify a code.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.support import VERIFY_RIGHT, Actors, TestClock
from twofactor_service.server import RunningServer

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: the Node client test needs Node.js 20 and npm (README)")
    return path


@pytest.fixture(scope="session")
async def node() -> str:
    """The node executable, with clients/node's pinned dependencies installed by `npm ci` (once
    per run; into clients/node/node_modules, which git ignores)."""
    npm_ci = await asyncio.create_subprocess_exec(
        _tool("npm"),
        "ci",
        "--no-audit",
        "--no-fund",
        cwd=NODE_CLIENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(npm_ci.communicate(), timeout=300)
    assert npm_ci.returncode == 0, output.decode(errors="replace")
    return _tool("node")


async def run_walkthrough(node: str, env: dict[str, str], clock: TestClock) -> list[dict[str, Any]]:
    """Runs clients/node/walkthrough.js to the end and returns what it printed. When it asks for
    the next time step, the shared test clock moves 30 s forward (as Person.next_code() does)
    before it computes the code; the in-process server keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        node,
        "walkthrough.js",
        cwd=NODE_CLIENT,
        env={**os.environ, **env, "TWOFACTOR_CLOCK_OFFSET_SECONDS": repr(clock.offset)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())
    printed: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            while line := await process.stdout.readline():
                message = json.loads(line)
                if message.get("event") == "advance_clock":
                    clock.advance(message["seconds"])
                    process.stdin.write(b"advanced\n")
                    await process.stdin.drain()
                else:
                    printed.append(message)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    errors = (await stderr).decode(errors="replace")
    assert process.returncode == 0, f"node exited {process.returncode}: {printed} {errors}"
    return printed


async def test_node_client_enrolls_signs_in_with_a_code_and_verifies_a_code(
    server: RunningServer, actors: Actors, clock: TestClock, node: str
) -> None:
    alice = await actors.create("node-alice")  # allowlisted: sets up a key at first sign-in
    verifier = await actors.create("node-verifier", excluded=True, rights=(VERIFY_RIGHT,))

    printed = await run_walkthrough(
        node,
        {
            "TWOFACTOR_ADDRESS": f"127.0.0.1:{server.port}",
            "TWOFACTOR_USERNAME": alice.username,
            "TWOFACTOR_PASSWORD": alice.password,
            "TWOFACTOR_SERVICE_USERNAME": verifier.username,
            "TWOFACTOR_SERVICE_PASSWORD": verifier.password,
        },
        clock,
    )

    steps = {message["step"]: message for message in printed}
    assert "failed" not in steps, steps.get("failed")
    assert steps["sign_in"]["outcome"] == "SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED"
    assert steps["sign_in"]["pending_key"]["provisioning_uri_scheme"] == "otpauth:"
    assert steps["complete_enrollment"]["session_opened"] is True
    assert steps["sign_in_without_code"]["error"]["code"] == "UNAUTHENTICATED"
    assert steps["sign_in_without_code"]["error"]["reason"] == "CODE_REQUIRED"
    assert steps["sign_in_with_code"]["outcome"] == "SIGN_IN_OUTCOME_SESSION_OPENED"
    assert steps["sign_in_with_code"]["session_opened"] is True
    assert steps["account_status"] == {
        "step": "account_status",
        "state": "TWO_FACTOR_STATE_ENROLLED",
        "allowlisted": False,
    }
    assert steps["verify_code"]["result"] == "VERIFY_CODE_RESULT_OK"
    assert steps["verify_code_replayed"]["result"] == "VERIFY_CODE_RESULT_FAILED"
    assert steps["done"]["clock_offset_seconds"] == pytest.approx(clock.offset)
    # What the Node client did is what the service stored.
    admin = await actors.admin()
    status = await actors.stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=alice.username), metadata=admin.metadata()
    )
    assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
