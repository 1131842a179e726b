"""The README's walk-through (examples/walkthrough.py), run as a newcomer runs it: it must leave
the first administrator holding the key that is active at the end, shown on the terminal, and
write nothing to disk."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import PERIOD, Actors, TestClock
from twofactor_service import rules
from twofactor_service.server import RunningServer

WALKTHROUGH = Path(__file__).resolve().parent.parent / "examples" / "walkthrough.py"


def load_walkthrough() -> ModuleType:
    spec = importlib.util.spec_from_file_location("walkthrough", WALKTHROUGH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_walkthrough_leaves_the_user_holding_the_active_key(
    actors: Actors,
    server: RunningServer,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    clock: TestClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = await actors.create("admin", rights=(rules.ADMIN_RIGHT,))
    monkeypatch.chdir(tmp_path)
    walkthrough = load_walkthrough()
    # The app reads the suite's clock, and moves it instead of sleeping for a new time step;
    # the server under test reads the same clock. The script's blocking client runs in a
    # thread so that the in-process server keeps serving.
    app = walkthrough.AuthenticatorApp(now=clock.now, sleep=clock.advance)
    exit_code = await asyncio.to_thread(
        walkthrough.main, admin.username, admin.password, f"127.0.0.1:{server.port}", app
    )
    printed = capsys.readouterr().out

    assert exit_code == 0
    assert os.listdir(tmp_path) == [], "the walk-through wrote into the current directory"
    key = re.search(r"^  key: ([A-Z2-7]+)$", printed, re.MULTILINE)
    uri = re.search(r"^  uri: (otpauth://\S+)$", printed, re.MULTILINE)
    assert key, printed
    assert uri, printed
    assert parse_qs(urlsplit(uri[1]).query)["secret"] == [key[1]]
    assert printed.count("key: ") == 1, "only the key that stays active is shown"
    assert "▀" in printed or "▄" in printed, "the QR code is drawn on the terminal"

    # What the user's authenticator app now shows signs in; the step the script used is spent.
    clock.advance(PERIOD)
    signed_in = await stub.SignIn(
        pb.SignInRequest(
            username=admin.username,
            password=admin.password,
            code=pyotp.TOTP(key[1]).at(clock.now()),
        )
    )
    assert signed_in.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    status = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(),
        metadata=(("authorization", f"Bearer {signed_in.session.token}"),),
    )
    assert status.status.state == enums_pb2.TWO_FACTOR_STATE_ENROLLED


async def test_the_walkthrough_on_an_account_with_a_key_says_how_to_start_over(
    actors: Actors, server: RunningServer, tmp_path: Path
) -> None:
    """Run as the README says (a process, TWOFACTOR_ADDRESS naming the server): an account
    that already has a key is left alone, with the command that starts over."""
    user = await actors.user()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WALKTHROUGH),
        user.username,
        user.password,
        cwd=tmp_path,
        env={"TWOFACTOR_ADDRESS": f"127.0.0.1:{server.port}", "PATH": ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 1
    assert out == b""
    assert f"twofactor reset-key {user.username}" in err.decode()
    assert os.listdir(tmp_path) == []
    await actors.sign_in(user)  # the key the user holds still signs in
