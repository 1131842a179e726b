"""The README's five-minute walk-through: sign in, set up a key, regenerate it, and leave you
holding the key that is active at the end.

Run against `make run` after `twofactor create-user admin --password ... --admin`:
    .venv/bin/python examples/walkthrough.py admin 'choose-a-long-one'
pyotp stands in for the authenticator app on your phone while the script runs. The first key
is replaced in step 3, so it is not shown; the key that stays active is drawn as a QR code at
the end, with its secret and otpauth:// URI, for your authenticator app. Nothing is written to
disk. `TWOFACTOR_ADDRESS` (default 127.0.0.1:50051) points it at another server.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable

import grpc
import pyotp
import segno
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

PERIOD = 30


class AuthenticatorApp:
    """pyotp playing the app: the current code of a key. The service accepts each 30-second
    time step once per key, so a second code of the same key waits for the next step."""

    def __init__(
        self,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.now, self.sleep = now, sleep
        self.used: set[tuple[str, int]] = set()

    def code(self, secret: str) -> str:
        while (secret, step := int(self.now()) // PERIOD) in self.used:
            self.sleep(1)
        self.used.add((secret, step))
        return pyotp.TOTP(secret).at(step * PERIOD)


def reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call: what a client branches on."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def qr_for_terminal(uri: str) -> str:
    """The otpauth:// URI as a QR code drawn with block characters, for scanning off the
    screen (the same drawing `twofactor enroll` shows)."""
    out = io.StringIO()
    segno.make(uri, error="m").terminal(out=out, compact=True)
    return out.getvalue()


def main(username: str, password: str, address: str, app: AuthenticatorApp) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)

        # 1. First sign-in of an allowlisted account: the password alone, then set up a key.
        try:
            first = stub.SignIn(pb.SignInRequest(username=username, password=password))
        except grpc.RpcError as error:
            print(f"sign-in refused: {error.details()}", file=sys.stderr)
            if reason(error) == "CODE_REQUIRED":
                print(
                    f"{username} already has a key; this walk-through starts with an account "
                    f"that has none. To start over: .venv/bin/twofactor reset-key {username}",
                    file=sys.stderr,
                )
            return 1
        first_secret = first.enrollment.pending_key.secret_base32
        done = stub.CompleteEnrollment(
            pb.CompleteEnrollmentRequest(
                enrollment_ticket=first.enrollment.enrollment_ticket,
                code=app.code(first_secret),
            )
        )
        print("1. key set up (pyotp holds this first key; step 3 replaces it)")
        print("   session until", done.session.expire_time.ToJsonString())

        # 2. Every later sign-in: password and a code.
        print("2. signing in with password and code (a new code may take up to 30 s)")
        session = stub.SignIn(
            pb.SignInRequest(username=username, password=password, code=app.code(first_secret))
        ).session
        auth = (("authorization", f"Bearer {session.token}"),)
        status = stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=auth).status
        print("   state:", enums_pb2.TwoFactorState.Name(status.state))

        # 3. Regenerate your own key: begin (the new key is shown once), then "Check and apply".
        new_key = stub.BeginRegenerateSecret(
            pb.BeginRegenerateSecretRequest(), metadata=auth
        ).pending_key
        applied = stub.ConfirmRegenerateSecret(
            pb.ConfirmRegenerateSecretRequest(code=app.code(new_key.secret_base32)),
            metadata=auth,
        )
        print("3. key regenerated; new key active since", end=" ")
        print(applied.status.key_create_time.ToJsonString())

    # 4. Hand the active key over: it is not shown again.
    print()
    print(qr_for_terminal(new_key.provisioning_uri))
    print("Your key, active now and shown only this once. Scan the QR code with your")
    print("authenticator app, or type in the key:")
    print(f"  key: {new_key.secret_base32}")
    print(f"  uri: {new_key.provisioning_uri}")
    print(f"Sign in from now on with {username}'s password and the code the app shows.")
    print("Its current code was just used (each code works once): wait for the next one.")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("username")
    parser.add_argument("password")
    args = parser.parse_args()
    address = os.environ.get("TWOFACTOR_ADDRESS", "127.0.0.1:50051")
    sys.exit(main(args.username, args.password, address, AuthenticatorApp()))
