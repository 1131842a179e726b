"""ListAccounts, the console's Users tab: every account once, by username, a case-insensitive
prefix search, paging (AIP-132), and bad input refused without a change."""

from __future__ import annotations

from typing import TypeAlias

import grpc
import pytest
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, error_reason

Stub: TypeAlias = "pb_grpc.TwoFactorServiceAsyncStub"


async def list_all(stub: Stub, admin: Person, prefix: str, page_size: int) -> list[list[str]]:
    """The usernames of every page for `prefix`."""
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await stub.ListAccounts(
            pb.ListAccountsRequest(username_prefix=prefix, page_size=page_size, page_token=token),
            metadata=admin.metadata(),
        )
        pages.append([a.username for a in page.accounts])
        token = page.next_page_token
        if not token:
            return pages


async def test_prefix_search_pages_through_matching_accounts_in_username_order(
    actors: Actors, stub: Stub
) -> None:
    admin = await actors.admin()
    # Names sharing a prefix of this test's own (actors' names carry a unique part).
    prefix = f"Team-{actors.prefix}"
    members = [(await actors.create(f"{prefix}-{n}")).username for n in ("b", "A", "c", "d")]
    other = (await actors.create(f"other-{actors.prefix}")).username

    pages = await list_all(stub, admin, prefix.lower(), page_size=3)

    names = [name for page in pages for name in page]
    assert names == sorted(members, key=str.casefold)
    assert [len(page) for page in pages] == [3, 1]
    assert other not in names
    everything = [name for page in await list_all(stub, admin, "", 1000) for name in page]
    assert set(members) | {other, admin.username} <= set(everything)


async def test_listed_accounts_carry_their_state_and_protection(actors: Actors, stub: Stub) -> None:
    admin = await actors.admin()
    enrolled = await actors.user(protected=True)
    excluded = await actors.create("excluded", excluded=True)

    found = {}
    for person in (enrolled, excluded):
        page = await stub.ListAccounts(
            pb.ListAccountsRequest(username_prefix=person.username), metadata=admin.metadata()
        )
        found[person.username] = page.accounts[0]

    assert found[enrolled.username].state == enums_pb2.TWO_FACTOR_STATE_ENROLLED
    assert found[enrolled.username].protected
    assert found[excluded.username].state == enums_pb2.TWO_FACTOR_STATE_EXCLUDED
    assert not found[excluded.username].protected


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_token": "not a token!"}, "page_token"),
        ({"username_prefix": "x" * 257}, "username_prefix"),
        ({"username_prefix": "a\x00"}, "username_prefix"),
    ],
)
async def test_bad_list_accounts_request_is_invalid_argument(
    actors: Actors, stub: Stub, request_fields: dict[str, object], field: str
) -> None:
    admin = await actors.admin()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ListAccounts(
            pb.ListAccountsRequest(**request_fields),  # type: ignore[arg-type]
            metadata=admin.metadata(),
        )

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(failure.value) == "INVALID_ARGUMENT"
    assert (failure.value.details() or "").startswith(field)
