"""A flood of anonymous SignIns with made-up names, as a guesser sends them: `concurrency`
calls always in flight, each sent again the moment it is answered (no backoff), until SIGTERM.
Prints "flooding" once the server has answered 50 of them, and at the end one JSON object:
how many answers of each ErrorInfo reason it got.

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


async def flood(address: str, concurrency: int) -> Counter[str]:
    answers: Counter[str] = Counter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)

        async def guesser() -> None:
            while not stop.is_set():
                request = pb.SignInRequest(
                    username=f"guess-{uuid.uuid4().hex}", password=uuid.uuid4().hex
                )
                try:
                    await stub.SignIn(request, timeout=30)
                    answers["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    answers[error_reason(error) or error.code().name] += 1
                if answers.total() == 50:
                    print("flooding", flush=True)

        guessers = [asyncio.create_task(guesser()) for _ in range(concurrency)]
        await stop.wait()
        for task in guessers:
            task.cancel()
        await asyncio.gather(*guessers, return_exceptions=True)
    return answers


if __name__ == "__main__":
    counts = asyncio.run(flood(sys.argv[1], int(sys.argv[2])))
    print(json.dumps(counts), flush=True)
