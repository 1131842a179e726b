"""Who is calling, for the audit log: a signed-in actor, an anonymous caller, or the CLI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from twofactor_service.rules import Actor
from twofactor_service.store.audit import AuditEntry

# The peer of a call the web console's bridge forwarded: "console:<browser address>".
CONSOLE_PEER_PREFIX = "console:"


@dataclass(frozen=True)
class Caller:
    actor: Actor | None
    # The name recorded as actor: the actor's username, "cli:<os user>", or "" (anonymous).
    actor_name: str
    operation: str
    request_id: str
    peer: str
    # For an operation that learns its targets from a payload (ImportSecrets): checks the
    # step-up proof the call carries, for a protected account it names (the call pipeline's
    # step 5, deferred). None where no proof can come with the call (the command line).
    prove_step_up: Callable[[str], Awaitable[None]] | None = None

    @property
    def through_console(self) -> bool:
        """The call came from the web console's bridge (transport/forwarded_peer.py)."""
        return self.peer.startswith(CONSOLE_PEER_PREFIX)

    def audit(self, target: str, *, success: bool = True, reason: str = "") -> AuditEntry:
        return AuditEntry(
            actor=self.actor_name,
            target=target,
            operation=self.operation,
            success=success,
            reason=reason,
            request_id=self.request_id,
            peer=self.peer,
        )

    def signed_in(self) -> Actor:
        assert self.actor is not None, "operation needs a signed-in actor"
        return self.actor
