"""The Recovery codes section of one's own page, played in a real browser (headless Chromium,
driven by Playwright, as tests/test_console_browser.py does): generate a set with a current
code, see it once, download it as text, see the count left and the warning when few are left,
replace the set; and a protected account's Account protection window, which asks once.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from playwright.async_api import Browser, Locator, Page, expect
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import Actors, Person, error_reason
from tests.test_console_browser import STEP_TIMEOUT_MS, Screens, sign_in

# The headless Chromium fixture, shared with the seed page's browser test.
from tests.test_console_browser import browser as browser
from twofactor_service.server import RunningServer


async def sign_in_with_recovery_code(
    stub: pb_grpc.TwoFactorServiceAsyncStub, person: Person, code: str
) -> pb.SignInResponse:
    response: pb.SignInResponse = await stub.SignIn(
        pb.SignInRequest(username=person.username, password=person.password, recovery_code=code)
    )
    return response


async def shown_codes(page: Page) -> list[str]:
    listed = page.get_by_role("list", name="New recovery codes").get_by_role("listitem")
    await expect(listed).to_have_count(10)
    return [text.strip() for text in await listed.all_inner_texts()]


def section(page: Page) -> Locator:
    return page.get_by_role("region", name="Recovery codes")


async def own_page(browser: Browser, url: str, person: Person) -> Page:
    """Signs an enrolled account in as the seed scenario does, on its own page."""
    context = await browser.new_context(accept_downloads=True)
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    await sign_in(page, url, person)
    await expect(page.get_by_role("heading", name=person.username)).to_be_visible()
    return page


async def test_recovery_codes_are_generated_shown_once_and_downloaded(
    browser: Browser,
    server: RunningServer,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    actors: Actors,
    tmp_path: Path,
) -> None:
    assert server.console is not None
    alice = await actors.user()
    page = await own_page(browser, server.console.url, alice)
    recovery = section(page)
    await expect(recovery).to_contain_text("You have no recovery codes.")
    screens = Screens()
    await screens.save(page, "recovery-codes")

    await recovery.get_by_label("Current code from the authenticator app").fill(alice.next_code())
    await recovery.get_by_role("button", name="Generate new recovery codes").click()

    codes = await shown_codes(page)
    await screens.save(page, "recovery-codes-shown")
    assert len(set(codes)) == 10
    async with page.expect_download() as started:
        await recovery.get_by_role("button", name="Download as text").click()
    download = await started.value
    assert download.suggested_filename == f"recovery-codes-{alice.username}.txt"
    saved = tmp_path / "codes.txt"
    await download.save_as(saved)
    assert [line for line in saved.read_text().splitlines() if line in codes] == codes
    await recovery.get_by_role("button", name="Done").click()
    await expect(recovery).to_contain_text("10 recovery codes are left.")
    await expect(page.get_by_role("list", name="New recovery codes")).to_have_count(0)
    await expect(recovery.locator(".warning")).to_have_count(0)

    # Seven used: three left, and the section warns.
    for code in codes[:7]:
        opened = await sign_in_with_recovery_code(stub, alice, code)
        assert opened.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED
    await page.reload()
    await expect(recovery.locator(".warning")).to_have_text(
        "3 recovery codes are left. Only a few are left: generate a new set."
    )
    await screens.check(page, "recovery-codes-warning")

    # A new set replaces the old one, after a confirmation.
    await recovery.get_by_label("Current code from the authenticator app").fill(alice.next_code())
    await recovery.get_by_role("button", name="Generate new recovery codes").click()
    await (
        page.get_by_role("dialog", name="Generate new recovery codes")
        .get_by_role("button", name="Generate")
        .click()
    )
    new_codes = await shown_codes(page)
    assert set(new_codes).isdisjoint(codes)
    with pytest.raises(grpc.aio.AioRpcError) as old_refused:
        await sign_in_with_recovery_code(stub, alice, codes[9])
    assert error_reason(old_refused.value) == "INVALID_CREDENTIALS"
    assert (await sign_in_with_recovery_code(stub, alice, new_codes[0])).session.token

    # A wrong code is refused with the server's reason, and nothing is shown.
    await recovery.get_by_role("button", name="Done").click()
    await recovery.get_by_label("Current code from the authenticator app").fill("000000")
    await recovery.get_by_role("button", name="Generate new recovery codes").click()
    await (
        page.get_by_role("dialog", name="Generate new recovery codes")
        .get_by_role("button", name="Generate")
        .click()
    )
    await expect(recovery.get_by_role("alert").locator(".reason")).to_have_text("CODE_INVALID")
    await page.context.close()


async def test_a_protected_account_confirms_in_the_account_protection_window_once(
    browser: Browser, server: RunningServer, actors: Actors
) -> None:
    assert server.console is not None
    bob = await actors.user(protected=True)
    page = await own_page(browser, server.console.url, bob)
    recovery = section(page)
    code = bob.next_code()

    await recovery.get_by_label("Current code from the authenticator app").fill(code)
    await recovery.get_by_role("button", name="Generate new recovery codes").click()
    protection = page.get_by_role("dialog", name="Account protection")
    await expect(protection).to_be_visible()
    await protection.get_by_label("Password").fill(bob.password)
    # The same code again: the window's proof is the code the call needed.
    await protection.get_by_label("Two-factor authentication code").fill(code)
    await protection.get_by_role("button", name="OK").click()

    assert len(await shown_codes(page)) == 10
    await page.context.close()
