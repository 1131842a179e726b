"""The committed Python client (clients/python) is what the protos generate: a stale checkout
fails here, not in another team's build."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def test_committed_python_client_is_generated_from_the_current_protos() -> None:
    check = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "generate_protos.py"),
        "--check",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(check.communicate(), timeout=120)

    assert check.returncode == 0, stderr.decode(errors="replace")
