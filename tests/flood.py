"""A flood of anonymous SignIns with made-up names, as a guesser sends them: `concurrency`
calls always in flight, each sent again the moment it is answered (no backoff), until SIGTERM.

It starts flooding, and prints "flooding" once the server has answered 50 of them. SIGUSR1
pauses it: no call is sent any more, and it prints "paused" once every call in flight has been
answered. SIGUSR2 resumes it, and it prints "flooding" again after 50 more answers. At the end
it prints one JSON object: how many answers of each ErrorInfo reason it got.

    python -m tests.flood HOST:PORT CONCURRENCY
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections import Counter

import grpc
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import error_reason

ANSWERS_BEFORE_FLOODING = 50


async def flood(address: str, concurrency: int) -> Counter[str]:
    answers: Counter[str] = Counter()
    stop = asyncio.Event()
    sending = asyncio.Event()
    in_flight = 0
    flooding_from = ANSWERS_BEFORE_FLOODING  # the answer count at which to say "flooding"

    def pause() -> None:
        sending.clear()
        if in_flight == 0:
            print("paused", flush=True)

    def resume() -> None:
        nonlocal flooding_from
        flooding_from = answers.total() + ANSWERS_BEFORE_FLOODING
        sending.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, pause)
    loop.add_signal_handler(signal.SIGUSR2, resume)
    sending.set()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)

        async def guesser() -> None:
            nonlocal in_flight
            while not stop.is_set():
                await sending.wait()
                request = pb.SignInRequest(
                    username=f"guess-{uuid.uuid4().hex}", password=uuid.uuid4().hex
                )
                in_flight += 1
                try:
                    await stub.SignIn(request, timeout=30)
                    answers["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    answers[error_reason(error) or error.code().name] += 1
                finally:
                    in_flight -= 1
                if answers.total() == flooding_from:
                    print("flooding", flush=True)
                if not sending.is_set() and in_flight == 0:
                    print("paused", flush=True)

        guessers = [asyncio.create_task(guesser()) for _ in range(concurrency)]
        await stop.wait()
        for task in guessers:
            task.cancel()
        await asyncio.gather(*guessers, return_exceptions=True)
    return answers


if __name__ == "__main__":
    counts = asyncio.run(flood(sys.argv[1], int(sys.argv[2])))
    print(json.dumps(counts), flush=True)
