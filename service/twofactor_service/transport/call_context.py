"""Per-call state, carried in contextvars from the call pipeline to the handlers."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from twofactor_service.caller import Caller
from twofactor_service.rules import Actor, MethodPolicy


@dataclass(frozen=True)
class CallInfo:
    method: str
    # The RPC's short name, e.g. "ResetSecret": the audit log's operation.
    operation: str
    policy: MethodPolicy
    request_id: str
    peer: str


call_info: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("call_info")
current_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "current_actor", default=None
)
# The account named by the request's target field, once known (for the audit log).
current_target: contextvars.ContextVar[str] = contextvars.ContextVar("current_target", default="")
# Whether this call carried account-protection proof that was checked and held (the step-up
# step): its code then counts as the current code an operation asks for (GenerateRecoveryCodes).
step_up_proven: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "step_up_proven", default=False
)
# For a method whose targets are named in its payload: checks the call's step-up proof for one
# protected target (set by the pipeline; see Caller.prove_step_up).
payload_step_up: contextvars.ContextVar[Callable[[str], Awaitable[None]] | None] = (
    contextvars.ContextVar("payload_step_up", default=None)
)


def actor() -> Actor:
    """The signed-in actor; only called by handlers whose policy requires a session."""
    value = current_actor.get()
    assert value is not None, "handler of an authenticated RPC ran without an actor"
    return value


def caller() -> Caller:
    """Who is calling, for the operations and their audit events."""
    info = call_info.get()
    signed_in = current_actor.get()
    return Caller(
        actor=signed_in,
        actor_name=signed_in.username if signed_in else "",
        operation=info.operation,
        request_id=info.request_id,
        peer=info.peer,
        prove_step_up=payload_step_up.get(),
    )
