"""SPEC §3/§4 "never INTERNAL for bad input", by property: every RPC of TwoFactorService, its
request built from the descriptor and filled with arbitrary values (any text, control
characters, bytes read as text, very long strings, numbers of every width, unknown enum values,
out-of-range timestamps), called by an administrator, with step-up proof where the RPC guards
a protected account. No call ends INTERNAL or UNKNOWN (nor UNAVAILABLE, with the database up),
and a refused call leaves the database as it was.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests import support
from tests.support import VERIFY_RIGHT, VOUCH_RIGHT, Actors, Person
from twofactor_service import rules
from twofactor_service.policy import SERVICE, load_policies
from twofactor_service.rules import AccountKind
from twofactor_service.runtime import Runtime
from twofactor_service.store.database import Connection

POLICIES = {path.rsplit("/", 1)[-1]: policy for path, policy in load_policies().items()}
METHODS = {m.name: m for m in SERVICE.methods}
REQUEST_CLASSES = {m.name: getattr(pb, m.input_type.name) for m in SERVICE.methods}

# Statuses that mean the server did not understand its own failure.
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
UNARY_DEADLINE_SECONDS = 10.0
# WatchAuditEvents is an endless stream: a well-formed request ends at its deadline.
STREAM_DEADLINE_SECONDS = 0.3

# What a refused call may still change: the audit log records it, the attempt it paid for is
# counted, a step-up code is used up, and session idle-time bookkeeping moves. Nothing else.
ATTEMPT_COLUMNS = ["failed_attempts", "attempts_open", "last_attempt_at", "locked_until"]
SNAPSHOT = {
    "accounts": ("id", ATTEMPT_COLUMNS),
    "account_rights": ("account_id, functional_area, permission", []),
    "secret_keys": ("id", ["last_used_step"]),
    "sessions": ("token_hash", ["last_seen_at"]),
    "enrollment_tickets": ("ticket_hash", []),
    "settings": ("singleton", []),
}

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


# Values that have broken services before: NUL (PostgreSQL text refuses it), digits outside
# ASCII, numbers past 64 bits, separators, byte-order marks, quoting.
NASTY_TEXTS = [
    "", " ", "\x00", "a\x00b", "\x7f", "\u0085", "\u2028", "\ufeff", "\U0001f4a5",
    "\u00b2", "\u0661\u0662", "\uff11\uff12\uff13\uff14\uff15\uff16", "-1", "0", "9" * 19, "9" * 20,
    "../", "%s%n", "' OR '1'='1", "\\", "null",
]  # fmt: skip


def _texts(known: list[str]) -> st.SearchStrategy[str]:
    """Text of every kind a client can send (protobuf strings are UTF-8, so no surrogates)."""
    nasty = st.sampled_from(NASTY_TEXTS)
    return st.one_of(
        nasty,
        st.text(),
        st.text(st.characters(max_codepoint=0x1F)),  # control characters, NUL included
        st.binary().map(lambda raw: raw.decode("latin-1")),  # bytes read as text
        st.integers().map(str),
        st.from_regex(r"[0-9]{5,9}", fullmatch=True),  # code-shaped, or nearly
        # Token-shaped: what a server that encodes page tokens in base64 would decode.
        st.one_of(nasty, st.text()).map(lambda t: base64.urlsafe_b64encode(t.encode()).decode()),
        # Very long: past the field limits, and past the server's message size limit.
        st.builds(lambda part, n: part * n, st.text(min_size=1, max_size=3), st.integers(0, 70000)),
        st.sampled_from(known),  # the accounts that exist, so requests get past lookups
        st.builds(lambda name, odd: name + odd, st.sampled_from(known), nasty),
    )


def _field_values(field: FieldDescriptor, known: list[str]) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _texts(known)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary()
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if field.type == FieldDescriptor.TYPE_DOUBLE else 32)
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        declared = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(declared), st.integers(-(2**31), 2**31 - 1))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return _messages(field.message_type, known)
    low, high = INT_RANGES[field.type]
    edges = [n for n in (low, high, -1, 0, 1, 2**31 - 1, 2**31, 2**63 - 1) if low <= n <= high]
    return st.one_of(
        st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -2), 1100)
    )


def _messages(descriptor: Descriptor, known: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field name → value (absent: unset) for `descriptor`, one level per message."""
    fields = {}
    for field in descriptor.fields:
        values = _field_values(field, known)
        if field.is_repeated:
            values = st.lists(values, max_size=3)
        fields[field.name] = st.one_of(st.none(), values)
    return st.fixed_dictionaries(fields)


def _fill(message: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.is_repeated:
            for item in value:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    # A map<K, V> field: on the wire, repeated (key, value) entries.
                    entry = field.message_type.fields_by_name
                    key, entry_value = item["key"], item["value"]
                    # An unset key or value of a map entry is its type's default.
                    target[key if key is not None else entry["key"].default_value] = (
                        entry_value if entry_value is not None else entry["value"].default_value
                    )
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(target, value)
            target.SetInParent()
        else:
            setattr(message, name, value)
    return message


async def _snapshot(db: Connection) -> dict[str, list[str]]:
    tables = {}
    for table, (order, ignored) in SNAPSHOT.items():
        rows = await db.fetch(
            f"SELECT (to_jsonb(t) - $1::text[])::text AS row FROM {table} t ORDER BY {order}",  # noqa: S608 - names from SNAPSHOT
            ignored,
        )
        tables[table] = [r["row"] for r in rows]
    return tables


@dataclass
class Cast:
    """The accounts the fuzzed requests may name, beside made-up ones."""

    admin: Person
    others: list[str]


@pytest.fixture(scope="module")
async def targets(
    stub: pb_grpc.TwoFactorServiceAsyncStub, runtime: Runtime, clock: support.TestClock
) -> list[str]:
    """Accounts in every state: enrolled, protected, allowlisted, excluded, domain."""
    actors = Actors(stub, runtime, clock, prefix=f"fuzz-{uuid.uuid4().hex[:6]}")
    people = [
        await actors.user(),
        await actors.user(protected=True),
        await actors.create("allowlisted"),
        await actors.create("excluded", excluded=True),
        await actors.create("domain", kind=AccountKind.DOMAIN),
    ]
    return [p.username for p in people]


@pytest.fixture
async def cast(actors: Actors, targets: list[str], db: Connection) -> AsyncIterator[Cast]:
    """A fresh administrator per RPC (a fuzzed call may sign it out or lock it), who also holds
    the service rights, so VerifyCode and SignInDomainAccount get past authorization."""
    admin = await actors.enroll(
        await actors.create("admin", rights=(rules.ADMIN_RIGHT, VERIFY_RIGHT, VOUCH_RIGHT))
    )
    issuer = await db.fetchval("SELECT issuer_name FROM settings")
    yield Cast(admin, targets)
    # UpdateSettings may succeed with any printable name: put the issuer back for other tests.
    if issuer is None:
        await db.execute("DELETE FROM settings")
    else:
        await db.execute("UPDATE settings SET issuer_name = $1", issuer)


async def _call(
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    method: MethodDescriptor,
    request: Message,
    metadata: tuple[tuple[str, str], ...],
) -> grpc.StatusCode:
    rpc = getattr(stub, method.name)
    try:
        if method.server_streaming:
            async for _ in rpc(request, metadata=metadata, timeout=STREAM_DEADLINE_SECONDS):
                pass
        else:
            await rpc(request, metadata=metadata, timeout=UNARY_DEADLINE_SECONDS)
    except grpc.aio.AioRpcError as failure:
        code: grpc.StatusCode = failure.code()
        hung = code is grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming
        if code in NEVER or hung:
            pytest.fail(f"{method.name}({request!r:.500}) -> {code.name}: {failure.details()}")
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("name", list(METHODS))
@settings(
    max_examples=25,
    deadline=None,
    # The fixtures (server, accounts) are meant to outlive the examples; each example checks
    # its own before/after.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_arbitrary_requests_never_fail_internally_nor_change_anything_when_refused(
    name: str,
    data: st.DataObject,
    cast: Cast,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    db: Connection,
) -> None:
    method = METHODS[name]
    values = data.draw(_messages(method.input_type, cast.others), label="request")
    request = _fill(REQUEST_CLASSES[name](), values)
    admin = cast.admin
    # Step-up proof with a fresh code of the administrator's own key, where the RPC asks.
    metadata = admin.step_up() if POLICIES[name].protects_target else admin.metadata()

    before = await _snapshot(db)
    code = await _call(stub, method, request, metadata)

    if code is not grpc.StatusCode.OK:
        assert await _snapshot(db) == before, f"{name} refused with {code.name} but changed data"
