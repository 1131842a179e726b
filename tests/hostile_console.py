"""An anonymous attacker of the web console's HTTP port (issue 16), all at once and without
pause, each attack sent again the moment it is answered or cut off:

- compressed bombs: SignIn with `Content-Encoding: gzip`, about 1 MiB that inflates to 1 GiB;
- slow bodies: a whole head, then the body a byte at a time;
- idle connections: held open with nothing sent, opened again when closed;
- garbage: bytes that are not HTTP, and requests with malformed headers;
- a SignIn flood: well-formed gRPC-Web SignIns with made-up names, through the console.

It prints "attacking" once every kind is under way: answered at least once, or for slow bodies and
idle connections, opened. SIGUSR1 pauses it: every
attack stops, every connection is closed, and it prints "paused". SIGUSR2 resumes it. At SIGTERM
it prints one JSON object: how many answers (HTTP status, or how the connection ended) each kind
got, and how many slow-body and idle connections it opened.

    python -m tests.hostile_console HOST:PORT [KIND,KIND…]   (default: every kind)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import struct
import sys
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
from twofactor.v1 import twofactor_service_pb2 as pb

SIGN_IN = "/twofactor.v1.TwoFactorService/SignIn"
KINDS = ("bomb", "slow-body", "idle", "garbage", "sign-in")
# How many of each at once.
BOMBERS, SLOW_BODIES, IDLERS, GARBAGE, SIGN_INS = 2, 4, 30, 2, 8
ANSWER_TIMEOUT = 30.0
# Between two bombs, or two rounds of garbage, from one sender: 2 senders make about 100 bombs a
# second (the three stalled every backend for seconds). Unpaced, on the test's two
# shared cores, the attacker's own sending (the kernel's loopback copies and connection setup,
# which no CPU class holds back) would stand in for clients that are not on the server's
# machine at all.
PACE_SECONDS = 0.02


def gzip_bomb(inflated: int = 1 << 30) -> bytes:
    """`inflated` zero bytes, gzip-compressed (about a thousandth of the size)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = [packer.compress(chunk) for _ in range(inflated // len(chunk))]
    parts.append(packer.flush())
    return b"".join(parts)


def frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


async def status_of(reader: asyncio.StreamReader) -> str:
    """The status code of the answer, or how the connection ended without one."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            line = await reader.readline()
    except TimeoutError:
        return "no-answer"
    except ConnectionError:
        return "reset"
    if not line:
        return "closed"
    parts = line.split()
    return parts[1].decode("ascii", "replace") if len(parts) > 1 else "unparsable"


class Attack:
    def __init__(self, address: str) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.counts: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        # Connections of the slow kinds opened (and sent to), which are answered only when a
        # timeout ends them.
        self.opened: Counter[str] = Counter()
        self.bomb = gzip_bomb()
        self.head_host = f"Host: {address}\r\n"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def bomber(self) -> None:
        reader, writer = await self.connect()
        try:
            writer.write(
                (
                    f"POST {SIGN_IN} HTTP/1.1\r\n{self.head_host}"
                    "Content-Type: application/grpc-web+proto\r\nContent-Encoding: gzip\r\n"
                    f"Content-Length: {len(self.bomb)}\r\n\r\n"
                ).encode("ascii")
                + self.bomb
            )
            self.counts["bomb"][await status_of(reader)] += 1
        finally:
            writer.close()

    async def slow_body(self) -> None:
        reader, writer = await self.connect()
        try:
            writer.write(
                (
                    f"POST {SIGN_IN} HTTP/1.1\r\n{self.head_host}"
                    "Content-Type: application/grpc-web+proto\r\nContent-Length: 1000\r\n\r\n"
                ).encode("ascii")
            )
            self.opened["slow-body"] += 1
            answer = asyncio.ensure_future(status_of(reader))
            while not answer.done():
                with contextlib.suppress(ConnectionError):
                    writer.write(b"\x00")
                # The attacker's pace: a byte every half second.
                await asyncio.wait([answer], timeout=0.5)
            self.counts["slow-body"][answer.result()] += 1
        finally:
            writer.close()

    async def idler(self) -> None:
        reader, writer = await self.connect()
        self.opened["idle"] += 1
        try:
            self.counts["idle"][await status_of(reader)] += 1
        finally:
            writer.close()

    async def garbage(self) -> None:
        for junk in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + self.head_host.encode() + b"Bad Header Line\r\n\r\n",
            b"POST / HTTP/1.1\r\n" + self.head_host.encode() + b"Content-Length: x\r\n\r\n",
        ):
            reader, writer = await self.connect()
            try:
                writer.write(junk)
                self.counts["garbage"][await status_of(reader)] += 1
            finally:
                writer.close()

    async def sign_ins(self, session: aiohttp.ClientSession) -> None:
        request = pb.SignInRequest(username=f"guess-{uuid.uuid4().hex}", password=uuid.uuid4().hex)
        async with session.post(
            f"http://{self.host}:{self.port}{SIGN_IN}",
            data=frame(request.SerializeToString()),
            headers={"Content-Type": "application/grpc-web+proto"},
        ) as response:
            await response.read()
            self.counts["sign-in"][str(response.status)] += 1

    def answered(self) -> int:
        return sum(counter.total() for counter in self.counts.values())

    def progress(self) -> dict[str, int]:
        """Per kind: answers, and for the slow kinds connections opened."""
        return {kind: self.counts[kind].total() + self.opened[kind] for kind in KINDS}

    def every_kind_under_way_since(self, before: dict[str, int], kinds: tuple[str, ...]) -> bool:
        now = self.progress()
        return all(now[kind] > before[kind] for kind in kinds)


async def forever(
    step: Callable[[], Awaitable[None]], failures: Counter[str], pace: float = 0.0
) -> None:
    while True:
        try:
            await step()
        except (OSError, aiohttp.ClientError, asyncio.IncompleteReadError) as error:
            failures[type(error).__name__] += 1
        if pace:
            await asyncio.sleep(pace)


async def main(address: str, kinds: tuple[str, ...] = KINDS) -> None:
    attack = Attack(address)
    loop = asyncio.get_running_loop()
    stop, pause, resume = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, pause.set)
    loop.add_signal_handler(signal.SIGUSR2, resume.set)
    failures: Counter[str] = Counter()
    while not stop.is_set():
        before = attack.progress()
        connector = aiohttp.TCPConnector(limit=SIGN_INS)
        async with aiohttp.ClientSession(connector=connector) as session:
            every: dict[str, list[Callable[[], Awaitable[None]]]] = {
                "bomb": [attack.bomber] * BOMBERS,
                "slow-body": [attack.slow_body] * SLOW_BODIES,
                "idle": [attack.idler] * IDLERS,
                "garbage": [attack.garbage] * GARBAGE,
                "sign-in": [lambda: attack.sign_ins(session)] * SIGN_INS,
            }
            paced = ("bomb", "garbage")
            tasks = [
                asyncio.create_task(forever(step, failures, PACE_SECONDS * (kind in paced)))
                for kind in kinds
                for step in every[kind]
            ]
            said = False
            ended = asyncio.create_task(_either(stop, pause))
            while not ended.done():
                await asyncio.wait([ended], timeout=0.01)
                if not said and attack.every_kind_under_way_since(before, kinds):
                    print("attacking", flush=True)
                    said = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stop.is_set():
            break
        pause.clear()
        print("paused", flush=True)
        await _either(stop, resume)
        resume.clear()
    report = {kind: dict(counter) for kind, counter in attack.counts.items()}
    report |= {"opened": dict(attack.opened), "errors": dict(failures)}
    print(json.dumps(report), flush=True)


async def _either(one: asyncio.Event, other: asyncio.Event) -> None:
    waits = [asyncio.create_task(one.wait()), asyncio.create_task(other.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else KINDS))
