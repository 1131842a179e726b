"""The README's five-minute walk-through: sign in, set up a key, regenerate it.

Run against `make run` after `twofactor create-user admin --password ... --admin`:
    .venv/bin/python examples/walkthrough.py admin 'choose-a-long-one'
pyotp stands in for the authenticator app on your phone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc
import pyotp
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc


def fresh_code(secret: str, used: set[int]) -> str:
    """The authenticator app's current code, waiting for a new time step if this one was used
    (the service accepts each step once)."""
    while (step := int(time.time()) // 30) in used:
        time.sleep(1)
    used.add(step)
    return pyotp.TOTP(secret).at(step * 30)


def main(username: str, password: str, address: str = "127.0.0.1:50051") -> None:
    stub = pb_grpc.TwoFactorServiceStub(grpc.insecure_channel(address))
    used: set[int] = set()

    # 1. First sign-in of an allowlisted account: the password alone, then set up a key.
    first = stub.SignIn(pb.SignInRequest(username=username, password=password))
    if first.outcome != enums_pb2.SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED:
        sys.exit("this walk-through starts with an account that has no key yet")
    key = first.enrollment.pending_key
    Path("enroll-qr.png").write_bytes(key.qr_code_png)
    print("Scan enroll-qr.png, or enter", key.provisioning_uri)
    secret = key.secret_base32
    done = stub.CompleteEnrollment(
        pb.CompleteEnrollmentRequest(
            enrollment_ticket=first.enrollment.enrollment_ticket, code=fresh_code(secret, used)
        )
    )
    print("enrolled; session until", done.session.expire_time.ToJsonString())

    # 2. Every later sign-in: password and a code.
    session = stub.SignIn(
        pb.SignInRequest(username=username, password=password, code=fresh_code(secret, used))
    ).session
    auth = (("authorization", f"Bearer {session.token}"),)
    status = stub.GetAccountStatus(pb.GetAccountStatusRequest(), metadata=auth).status
    print("state:", enums_pb2.TwoFactorState.Name(status.state))

    # 3. Regenerate your own key: begin, scan the new key, "Check and apply".
    new_key = stub.BeginRegenerateSecret(pb.BeginRegenerateSecretRequest(), metadata=auth)
    new_secret = new_key.pending_key.secret_base32
    applied = stub.ConfirmRegenerateSecret(
        pb.ConfirmRegenerateSecretRequest(code=fresh_code(new_secret, set())), metadata=auth
    )
    print("new key active since", applied.status.key_create_time.ToJsonString())


if __name__ == "__main__":
    main(*sys.argv[1:])
