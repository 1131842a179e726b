"""The seed page, played by a person in a real browser: headless Chromium (Debian's package,
driven by Playwright) clicks through the console's screens against the real server.

An administrator made with the CLI signs in and sets up its key from the QR code the page
shows (decoded from the pixels, as a phone would); it resets a user's key and the user sets up
a new one at its next sign-in; it deletes the key and the user is refused with the reason; the
allowlist restores the user's access; a protected account asks for the Account protection
window; the administrator regenerates its own key; the audit log shows each step live, with the
browser as the peer. A screenshot of each screen goes to build/console-screenshots/.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
import zxingcpp
from PIL import Image
from playwright.async_api import Browser, Page, async_playwright, expect
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import PASSWORD, TEST_ENCRYPTION_KEYS, Actors, Person, TestClock
from twofactor_service.server import RunningServer

CHROMIUM = os.environ.get("TWOFACTOR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "console-screenshots"
# How long a page may take to show what a step expects; never reached when it works.
STEP_TIMEOUT_MS = 15_000
# The browser part's budget (the issue: under 2 minutes).
BROWSER_BUDGET_SECONDS = 120
expect.set_options(timeout=STEP_TIMEOUT_MS)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), (
        f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does)"
    )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


class Screens:
    """Numbered screenshots, one per screen, in the order the scenario reaches them."""

    def __init__(self) -> None:
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)
        SCREENSHOTS.mkdir(parents=True)
        self.count = 0

    async def save(self, page: Page, name: str) -> None:
        self.count += 1
        await page.screenshot(path=SCREENSHOTS / f"{self.count:02d}-{name}.png", full_page=True)


async def create_admin_with_cli(database_url: str, username: str) -> None:
    """The first administrator, made as the README says: `twofactor create-user NAME --admin`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= {
        "TWOFACTOR_DATABASE_URL": database_url,
        "TWOFACTOR_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,
        "TWOFACTOR_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twofactor_service.cli",
        "create-user",
        username,
        "--password",
        PASSWORD,
        "--admin",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


async def secret_from_qr_code(page: Page) -> str:
    """Reads the QR code shown on the page, as an authenticator app's camera would."""
    picture = await page.locator("img.qr").screenshot()
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(picture)))
    assert len(found) == 1, "no QR code could be read from the page"
    uri = urlsplit(found[0].text)
    assert uri.scheme == "otpauth"
    return parse_qs(uri.query)["secret"][0]


async def sign_in(page: Page, url: str, person: Person) -> None:
    """Fills the Sign in screen; gives the code at once when the account has a key."""
    await page.goto(url)
    await page.get_by_label("Username").fill(person.username)
    await page.get_by_label("Password").fill(person.password)
    await page.get_by_role("button", name="Sign in").click()
    if person.secret is not None:
        code = page.get_by_label("Two-factor authentication code")
        await expect(code).to_be_visible()
        await code.fill(person.next_code())
        await page.get_by_role("button", name="Sign in").click()


async def set_up_key(page: Page, person: Person) -> None:
    """On a "Two-factor authentication" panel: scan the QR code, type a code, Check and apply."""
    await expect(page.locator("img.qr")).to_be_visible()
    person.secret = await secret_from_qr_code(page)
    shown = (await page.locator(".secret").inner_text()).replace(" ", "")
    assert shown == person.secret, "the secret as text differs from the QR code"
    await page.get_by_label("Code from the authenticator app").fill(person.next_code())
    await page.get_by_role("button", name="Check and apply").click()


async def sign_out(page: Page) -> None:
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


async def open_user(page: Page, username: str) -> None:
    await page.get_by_role("link", name="Users").click()
    await page.get_by_label("Search by name").fill(username)
    await page.get_by_role("button", name="Search").click()
    await page.get_by_role("link", name=username, exact=True).click()
    await expect(page.get_by_role("heading", name=username)).to_be_visible()


async def state_shown(page: Page, state: str) -> None:
    """The user page's Two-factor authentication tab shows `state` (its first line)."""
    await expect(page.locator("dl.status dd").first).to_have_text(state)


async def test_the_seed_page_played_in_a_browser(
    browser: Browser,
    server: RunningServer,
    database_url: str,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    actors: Actors,
    clock: TestClock,
) -> None:
    started = time.monotonic()
    assert server.console is not None
    url = server.console.url
    screens = Screens()
    admin = Person(actors.name("console-admin"), clock=clock)
    await create_admin_with_cli(database_url, admin.username)
    alice = await actors.user()
    bob = await actors.user(protected=True)
    admin_context = await browser.new_context()
    alice_context = await browser.new_context()
    page = await admin_context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)

    # The administrator's first sign-in: a first-time setup from the QR code shown.
    await sign_in(page, url, admin)
    await expect(page.get_by_role("heading", name="First sign-in")).to_be_visible()
    await screens.save(page, "sign-in-first-time-setup")
    await set_up_key(page, admin)
    await expect(page.get_by_role("heading", name="Users")).to_be_visible()
    await screens.save(page, "users")

    # Reset alice's key (another account): confirm, and she is on the allowlist.
    await open_user(page, alice.username)
    await state_shown(page, "ENROLLED")
    await screens.save(page, "user-two-factor-tab")
    await page.get_by_role("button", name="Reset secret key").click()
    await expect(page.get_by_role("dialog", name="Reset secret key")).to_be_visible()
    await screens.save(page, "confirm-reset")
    await page.get_by_role("button", name="Reset", exact=True).click()
    await expect(page.get_by_role("status")).to_have_text(
        f"The secret key of {alice.username} is reset."
    )
    await state_shown(page, "ALLOWLISTED")

    # alice sets up a new key at her next sign-in.
    alice.secret = None
    alice_page = await alice_context.new_page()
    alice_page.set_default_timeout(STEP_TIMEOUT_MS)
    await sign_in(alice_page, url, alice)
    await set_up_key(alice_page, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()
    # A plain user is offered her own page only, and Regenerate there.
    await expect(alice_page.get_by_role("link", name="Users")).to_have_count(0)
    await expect(alice_page.get_by_role("button", name="Regenerate secret key")).to_be_visible()
    await expect(alice_page.get_by_role("button", name="Reset secret key")).to_have_count(0)
    await screens.save(alice_page, "own-account")

    # The administrator deletes alice's key: she is refused, with the reason.
    await page.get_by_role("link", name="Users").click()
    await open_user(page, alice.username)
    await state_shown(page, "ENROLLED")
    await page.get_by_role("button", name="Delete secret key").click()
    await page.get_by_role("button", name="Delete", exact=True).click()
    await state_shown(page, "BLOCKED")
    await sign_out(alice_page)
    await sign_in(alice_page, url, alice)
    refusal = alice_page.get_by_role("alert")
    await expect(refusal.locator(".reason")).to_have_text("TWO_FACTOR_KEY_DELETED")
    await expect(refusal.locator(".message")).to_contain_text("allowlist")
    await screens.save(alice_page, "sign-in-blocked")

    # The allowlist restores her access (Administration Server properties).
    await page.get_by_role("link", name="Administration Server properties").click()
    allowlist = page.get_by_role("region", name="Two-factor authentication allowlist")
    await allowlist.get_by_label("Account name").fill(alice.username)
    await allowlist.get_by_role("button", name="Add", exact=True).click()
    await expect(allowlist.get_by_role("link", name=alice.username, exact=True)).to_be_visible()
    await screens.save(page, "administration-server-properties")
    alice.secret = None
    await sign_in(alice_page, url, alice)
    await set_up_key(alice_page, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()

    # bob is protected: resetting his key asks for the Account protection window.
    await open_user(page, bob.username)
    await page.get_by_role("button", name="Reset secret key").click()
    await page.get_by_role("button", name="Reset", exact=True).click()
    protection = page.get_by_role("dialog", name="Account protection")
    await expect(protection).to_be_visible()
    await screens.save(page, "account-protection")
    await protection.get_by_label("Password").fill(admin.password)
    await protection.get_by_label("Two-factor authentication code").fill(admin.next_code())
    await protection.get_by_role("button", name="OK").click()
    await state_shown(page, "ALLOWLISTED")

    # The administrator regenerates its own key (My account).
    await page.get_by_role("link", name="My account").click()
    await page.get_by_role("button", name="Regenerate secret key").click()
    await screens.save(page, "regenerate-own-key")
    await set_up_key(page, admin)
    await expect(page.get_by_role("status")).to_have_text(
        "The secret key for your account is changed."
    )

    # The audit log: newest first, and an event appears while it is open. The browser's
    # calls are recorded with the browser's address.
    await page.get_by_role("link", name="Audit log").click()
    newest = page.locator("table.audit tbody tr").first
    await expect(newest).to_contain_text("ConfirmRegenerateSecret")
    await expect(newest).to_contain_text("console:ipv4:127.0.0.1:")
    await expect(page.get_by_text("Following new events.")).to_be_visible()
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.SignIn(pb.SignInRequest(username=bob.username, password="not his password"))
    await expect(newest).to_contain_text("INVALID_CREDENTIALS")
    await screens.save(page, "audit-log")

    # An account excluded from 2FA signs in with its password alone and sees its own page,
    # with nothing offered: regenerating needs an active key.
    service = await actors.create("service", excluded=True)
    await sign_out(alice_page)
    await sign_in(alice_page, url, service)
    await expect(alice_page.get_by_role("heading", name=service.username)).to_be_visible()
    await state_shown(alice_page, "EXCLUDED")
    await expect(alice_page.locator("section.tab button")).to_have_count(0)

    await admin_context.close()
    await alice_context.close()
    assert screens.count == 10
    elapsed = time.monotonic() - started
    assert elapsed < BROWSER_BUDGET_SECONDS, f"the browser part took {elapsed:.0f} s"
