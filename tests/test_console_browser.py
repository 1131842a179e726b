"""The seed page, played by a person in a real browser: headless Chromium (Debian's package,
driven by Playwright) goes through the console's screens against the real server.

An administrator made with the CLI signs in and sets up its key from the QR code the page
shows (decoded from the pixels, as a phone would); it resets a user's key and the user sets up
a new one at its next sign-in; it deletes the key, the user's session ends and the user is
refused with the reason; the allowlist restores the user's access; a protected account asks for
the Account protection window; the administrator regenerates its own key; the audit log shows
each step live, with the browser as the peer. The same scenario is played again by keyboard
alone. Accounts are created, rights granted and revoked, protection turned on and off from the
console. axe-core checks every screen against WCAG 2.1 A and AA. A screenshot of each screen
goes to build/console-screenshots/ (TWOFACTOR_CONSOLE_SCREENSHOTS=docs/console for the docs).
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
from axe_playwright_python.async_playwright import Axe
from PIL import Image
from playwright.async_api import Browser, Locator, Page, Response, async_playwright, expect
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import PASSWORD, TEST_ENCRYPTION_KEYS, Actors, Person, TestClock, error_reason
from twofactor_service import rules
from twofactor_service.server import RunningServer

ROOT = Path(__file__).resolve().parent.parent
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
SCREENSHOTS = ROOT / os.environ.get("TWOFACTOR_CONSOLE_SCREENSHOTS", "build/console-screenshots")
# How long a page may take to show what a step expects; never reached when it works.
STEP_TIMEOUT_MS = 15_000
# Each test's budget in the browser (the first issue: the scenario under 2 minutes).
BROWSER_BUDGET_SECONDS = 120
# The rules axe-core holds the console to: WCAG 2.0 and 2.1, levels A and AA.
WCAG_21_AA = {
    "runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]},
    "resultTypes": ["violations"],
}
# Tab presses to reach a control: once around the page's stops (FOCUSABLE), and this many more.
MAX_TABS = 60
FOCUSABLE = "a[href], button, input, select, textarea, [tabindex]:not([tabindex='-1'])"
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
    """Each screen checked by axe-core against WCAG 2.1 A/AA, and a screenshot of it."""

    axe = Axe()

    def __init__(self) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    async def check(self, page: Page, name: str) -> None:
        results = await self.axe.run(page, options=WCAG_21_AA)
        found = [
            f"{v['id']} ({v['impact']}): {v['help']}: {[n['target'] for n in v['nodes']]}"
            for v in results.response["violations"]
        ]
        assert not found, f"screen {name!r} breaks WCAG 2.1 A/AA:\n" + "\n".join(found)

    async def save(self, page: Page, name: str) -> None:
        await self.check(page, name)
        self.names.append(name)
        await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


class FailedRequests:
    """Every response of the console with an HTTP error status (a missing icon included)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, page: Page) -> None:
        def record(response: Response) -> None:
            if response.status >= 400:
                self.seen.append(f"{response.status} {response.url}")

        page.on("response", record)


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


async def new_page(browser: Browser, failed: FailedRequests | None = None) -> Page:
    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    if failed is not None:
        failed.watch(page)
    return page


# --- With the mouse.


async def sign_in(page: Page, url: str, person: Person, screens: Screens | None = None) -> None:
    """Fills the Sign in screen; the code when the page asks for it, with no error first."""
    await page.goto(url)
    await page.get_by_label("Username").fill(person.username)
    await page.get_by_label("Password").fill(person.password)
    await page.get_by_role("button", name="Sign in").click()
    if person.secret is not None:
        code = page.get_by_label("Two-factor authentication code")
        await expect(code).to_be_focused()
        await expect(page.get_by_role("alert")).to_have_count(0)
        if screens is not None:
            await screens.save(page, "sign-in-code")
        await code.fill(person.next_code())
        await page.get_by_role("button", name="Sign in").click()


async def set_up_key(
    page: Page, person: Person, screens: Screens | None = None, *, how_shown: bool = False
) -> None:
    """The seed's steps in the "Two-factor authentication" window: View how to set up
    two-factor authentication (unless `how_shown`), View QR code, scan it, type a code, Check
    and apply."""
    if not how_shown:
        await page.get_by_role(
            "button", name="View how to set up two-factor authentication"
        ).click()
    await page.get_by_role("button", name="View QR code").click()
    await expect(page.locator("img.qr")).to_be_visible()
    if screens is not None:
        await screens.save(page, "two-factor-authentication-window")
    person.secret = await secret_from_qr_code(page)
    shown = (await page.locator(".secret").inner_text()).replace(" ", "")
    assert shown == person.secret, "the secret as text differs from the QR code"
    await page.get_by_label("Code from the authenticator app").fill(person.next_code())
    await page.get_by_role("button", name="Check and apply").click()


async def sign_out(page: Page) -> None:
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(page.get_by_role("status").filter(has_text="You signed out.")).to_be_visible()


async def open_user(page: Page, username: str) -> None:
    await page.get_by_role("link", name="Users").click()
    await page.get_by_label("Search by name").fill(username)
    await page.get_by_role("button", name="Search").click()
    await page.get_by_role("link", name=username, exact=True).click()
    await expect(page.get_by_role("heading", name=username)).to_be_visible()


async def state_shown(page: Page, state: str) -> None:
    """The user page's Two-factor authentication tab shows `state` (its first line)."""
    await expect(page.locator("dl.status dd").first).to_have_text(state)


def users_row(page: Page, username: str) -> Locator:
    return page.get_by_role("row").filter(has=page.get_by_role("link", name=username, exact=True))


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
    failed = FailedRequests()
    admin = Person(actors.name("console-admin"), clock=clock)
    await create_admin_with_cli(database_url, admin.username)
    alice = await actors.user()
    bob = await actors.user(protected=True)
    page = await new_page(browser, failed)
    alice_page = await new_page(browser, failed)

    # The administrator's first sign-in: a first-time setup, step by step as the seed says.
    await page.goto(url)
    await expect(page.get_by_label("Two-factor authentication code")).to_be_hidden()
    await screens.save(page, "sign-in")
    await sign_in(page, url, admin)
    await expect(page.get_by_role("heading", name="First sign-in")).to_be_visible()
    await expect(page.get_by_role("alert")).to_have_count(0)
    await expect(page.locator("img.qr")).to_be_hidden()
    await screens.save(page, "first-sign-in")
    await page.get_by_role("button", name="View how to set up two-factor authentication").click()
    await expect(
        page.get_by_role("heading", name="How to set up two-factor authentication")
    ).to_be_focused()
    await screens.save(page, "how-to-set-up")
    await set_up_key(page, admin, screens, how_shown=True)
    await expect(page.get_by_role("heading", name="Users")).to_be_visible()
    await expect(page.get_by_text(f"Signed in as {admin.username}")).to_be_visible()
    await screens.save(page, "users")

    # Reset alice's key (another account): confirm, and she is on the allowlist. Her session
    # ends with it.
    await sign_in(alice_page, url, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()
    await open_user(page, alice.username)
    await state_shown(page, "ENROLLED")
    await expect(page.get_by_role("tab", name="Two-factor authentication")).to_have_attribute(
        "aria-selected", "true"
    )
    await screens.save(page, "user-two-factor-tab")
    await page.get_by_role("button", name="Reset secret key").click()
    confirm = page.get_by_role("dialog", name="Reset secret key")
    await expect(confirm).to_be_visible()
    # The safe choice comes first and has the focus.
    await expect(confirm.get_by_role("button").first).to_have_text("Cancel")
    await expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    await screens.save(page, "confirm-reset")
    await page.get_by_role("button", name="Reset", exact=True).click()
    await expect(page.get_by_role("status")).to_have_text(
        f"The secret key of {alice.username} is reset."
    )
    await state_shown(page, "ALLOWLISTED")

    # alice's next step finds her session ended: back to Sign in, with why.
    await alice_page.get_by_role("link", name="My account").click()
    await expect(alice_page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(alice_page.get_by_role("alert")).to_contain_text("Your session has ended")
    await screens.save(alice_page, "sign-in-session-ended")

    # alice sets up a new key at her next sign-in.
    alice.secret = None
    await sign_in(alice_page, url, alice)
    await set_up_key(alice_page, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()
    # A plain user is offered her own page only, and Regenerate there.
    await expect(alice_page.get_by_role("link", name="Users")).to_have_count(0)
    await expect(alice_page.get_by_role("button", name="Regenerate secret key")).to_be_visible()
    await expect(alice_page.get_by_role("button", name="Reset secret key")).to_have_count(0)
    await screens.save(alice_page, "own-account")

    # The administrator deletes alice's key: she is refused, with the reason.
    await open_user(page, alice.username)
    await state_shown(page, "ENROLLED")
    await page.get_by_role("button", name="Delete secret key").click()
    await screens.save(page, "confirm-delete")
    await page.get_by_role("button", name="Delete", exact=True).click()
    await state_shown(page, "BLOCKED")
    alice.secret = None
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
    await expect(
        page.get_by_text("Besides the current code, the code just before and just after it")
    ).to_be_visible()
    await screens.save(page, "administration-server-properties")

    # Users shows her on the allowlist; once she has set up her key, the Users entry of the
    # menu (on Users already) shows her as she is now, without another search.
    await page.get_by_role("link", name="Users").click()
    await page.get_by_label("Search by name").fill(alice.username)
    await page.get_by_role("button", name="Search").click()
    await expect(users_row(page, alice.username).locator(".state")).to_have_text("ALLOWLISTED")
    alice.secret = None
    await sign_in(alice_page, url, alice)
    await set_up_key(alice_page, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()
    await page.get_by_role("link", name="Users").click()
    await expect(users_row(page, alice.username).locator(".state")).to_have_text("ENROLLED")
    await page.get_by_role("link", name="Administration Server properties").click()
    await expect(
        page.get_by_role("heading", name="Administration Server properties")
    ).to_be_visible()
    await expect(allowlist.get_by_role("link", name=alice.username, exact=True)).to_have_count(0)

    # bob is protected: resetting his key asks for the Account protection window.
    await open_user(page, bob.username)
    await page.get_by_role("button", name="Reset secret key").click()
    await page.get_by_role("button", name="Reset", exact=True).click()
    protection = page.get_by_role("dialog", name="Account protection")
    await expect(protection).to_be_visible()
    await expect(protection.get_by_label("Password")).to_be_focused()
    await screens.save(page, "account-protection")
    await protection.get_by_label("Password").fill(admin.password)
    await protection.get_by_label("Two-factor authentication code").fill(admin.next_code())
    await protection.get_by_role("button", name="OK").click()
    await state_shown(page, "ALLOWLISTED")

    # The administrator regenerates its own key (My account).
    await page.get_by_role("link", name="My account").click()
    await page.get_by_role("button", name="Regenerate secret key").click()
    await expect(
        page.get_by_role("button", name="View how to set up two-factor authentication")
    ).to_be_visible()
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
    await expect(alice_page.get_by_role("tabpanel").get_by_role("button")).to_have_count(0)

    await page.context.close()
    await alice_page.context.close()
    assert failed.seen == []
    elapsed = time.monotonic() - started
    assert elapsed < BROWSER_BUDGET_SECONDS, f"the browser part took {elapsed:.0f} s"


# --- By keyboard alone: Tab, Shift+Tab, Enter, Space, Escape and typing; no click.


async def is_focused(target: Locator) -> bool:
    return bool(await target.evaluate("element => element === document.activeElement"))


# Whether `target` (the element) comes before the focused element in the page.
_BEFORE_THE_FOCUS = """target => {
    const focus = document.activeElement;
    return focus !== null && focus !== document.body &&
        Boolean(target.compareDocumentPosition(focus) & Node.DOCUMENT_POSITION_FOLLOWING);
}"""


async def tab_to(page: Page, target: Locator) -> None:
    """Presses Tab until `target` has the focus, as a person moving through the page does:
    Shift+Tab when it is above the focus. The suite's database fills the lists of the pages
    as it goes (every account of every test), so a page holds ever more stops."""
    await expect(target).to_be_visible()
    key = "Shift+Tab" if await target.evaluate(_BEFORE_THE_FOCUS) else "Tab"
    stops = await page.locator(FOCUSABLE).count()
    for _ in range(MAX_TABS + stops):
        if await is_focused(target):
            return
        await page.keyboard.press(key)
    raise AssertionError(f"{MAX_TABS + stops} presses of {key} never reached {target}")


async def press_on(page: Page, target: Locator, key: str = "Enter") -> None:
    await tab_to(page, target)
    await page.keyboard.press(key)


async def type_into(page: Page, target: Locator, text: str) -> None:
    await tab_to(page, target)
    await page.keyboard.press("Control+A")
    await page.keyboard.type(text)


async def keyboard_sign_in(page: Page, url: str, person: Person) -> None:
    await page.goto(url)
    # The page starts in the Username field.
    await expect(page.get_by_label("Username")).to_be_focused()
    await page.keyboard.type(person.username)
    await page.keyboard.press("Tab")
    await page.keyboard.type(person.password)
    await page.keyboard.press("Enter")
    if person.secret is not None:
        # The code field appears with the focus.
        await expect(page.get_by_label("Two-factor authentication code")).to_be_focused()
        await page.keyboard.type(person.next_code())
        await page.keyboard.press("Enter")


async def keyboard_set_up_key(page: Page, person: Person) -> None:
    await press_on(
        page, page.get_by_role("button", name="View how to set up two-factor authentication")
    )
    await press_on(page, page.get_by_role("button", name="View QR code"), "Space")
    await expect(page.locator("img.qr")).to_be_visible()
    person.secret = await secret_from_qr_code(page)
    await type_into(page, page.get_by_label("Code from the authenticator app"), person.next_code())
    await page.keyboard.press("Enter")


async def keyboard_open_user(page: Page, username: str) -> None:
    await press_on(page, page.get_by_role("link", name="Users"))
    await type_into(page, page.get_by_label("Search by name"), username)
    await page.keyboard.press("Enter")
    await press_on(page, page.get_by_role("link", name=username, exact=True))
    await expect(page.get_by_role("heading", name=username)).to_be_visible()


async def test_the_seed_page_played_by_keyboard_alone(
    browser: Browser, server: RunningServer, actors: Actors
) -> None:
    started = time.monotonic()
    assert server.console is not None
    url = server.console.url
    admin = await actors.create("kbd-admin", rights=(rules.ADMIN_RIGHT,))
    alice = await actors.user()
    bob = await actors.user(protected=True)
    page = await new_page(browser)
    alice_page = await new_page(browser)

    # First sign-in and the first-time setup.
    await keyboard_sign_in(page, url, admin)
    await keyboard_set_up_key(page, admin)
    await expect(page.get_by_role("heading", name="Users")).to_be_visible()

    # Reset alice's key. Escape closes the confirmation and changes nothing; focus goes back
    # to the button that opened it; Tab stays inside the window.
    await keyboard_open_user(page, alice.username)
    reset = page.get_by_role("button", name="Reset secret key")
    await press_on(page, reset)
    confirm = page.get_by_role("dialog", name="Reset secret key")
    await expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    await page.keyboard.press("Escape")
    await expect(confirm).to_have_count(0)
    await expect(reset).to_be_focused()
    await state_shown(page, "ENROLLED")
    await page.keyboard.press("Enter")
    await expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(confirm.get_by_role("button", name="Reset", exact=True)).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    await page.keyboard.press("Shift+Tab")
    await expect(confirm.get_by_role("button", name="Reset", exact=True)).to_be_focused()
    await page.keyboard.press("Enter")
    await state_shown(page, "ALLOWLISTED")

    # alice sets up a new key.
    alice.secret = None
    await keyboard_sign_in(alice_page, url, alice)
    await keyboard_set_up_key(alice_page, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()

    # Delete her key: her session ends, and signing in again is refused with the reason.
    await press_on(page, page.get_by_role("link", name="Users"))
    await press_on(page, page.get_by_role("link", name=alice.username, exact=True))
    await state_shown(page, "ENROLLED")
    await press_on(page, page.get_by_role("button", name="Delete secret key"))
    delete = page.get_by_role("dialog", name="Delete secret key")
    await expect(delete.get_by_role("button", name="Cancel")).to_be_focused()
    await press_on(page, delete.get_by_role("button", name="Delete", exact=True), "Space")
    await state_shown(page, "BLOCKED")
    await press_on(alice_page, alice_page.get_by_role("link", name="My account"))
    await expect(alice_page.get_by_role("alert")).to_contain_text("Your session has ended")
    alice.secret = None
    await keyboard_sign_in(alice_page, url, alice)
    await expect(alice_page.get_by_role("alert").locator(".reason")).to_have_text(
        "TWO_FACTOR_KEY_DELETED"
    )

    # The allowlist restores her access.
    await press_on(page, page.get_by_role("link", name="Administration Server properties"))
    allowlist = page.get_by_role("region", name="Two-factor authentication allowlist")
    await type_into(page, allowlist.get_by_label("Account name"), alice.username)
    await page.keyboard.press("Enter")
    await expect(allowlist.get_by_role("link", name=alice.username, exact=True)).to_be_visible()
    await keyboard_sign_in(alice_page, url, alice)
    await keyboard_set_up_key(alice_page, alice)
    await expect(alice_page.get_by_role("heading", name=alice.username)).to_be_visible()

    # bob is protected: the Account protection window, filled and sent by keyboard.
    await keyboard_open_user(page, bob.username)
    await press_on(page, page.get_by_role("button", name="Reset secret key"))
    await press_on(page, page.get_by_role("button", name="Reset", exact=True))
    protection = page.get_by_role("dialog", name="Account protection")
    await expect(protection.get_by_label("Password")).to_be_focused()
    await page.keyboard.type(admin.password)
    await page.keyboard.press("Tab")
    await page.keyboard.type(admin.next_code())
    await page.keyboard.press("Enter")
    await state_shown(page, "ALLOWLISTED")

    # The administrator regenerates its own key.
    await press_on(page, page.get_by_role("link", name="My account"))
    await press_on(page, page.get_by_role("button", name="Regenerate secret key"))
    await keyboard_set_up_key(page, admin)
    await expect(page.get_by_role("status")).to_have_text(
        "The secret key for your account is changed."
    )

    # The audit log, then Sign out, which ends the session on the server.
    await press_on(page, page.get_by_role("link", name="Audit log"))
    await expect(page.locator("table.audit tbody tr").first).to_contain_text(
        "ConfirmRegenerateSecret"
    )
    await press_on(page, page.get_by_role("button", name="Sign out"))
    await expect(page.get_by_role("status").filter(has_text="You signed out.")).to_be_visible()

    await page.context.close()
    await alice_page.context.close()
    elapsed = time.monotonic() - started
    assert elapsed < BROWSER_BUDGET_SECONDS, f"the browser part took {elapsed:.0f} s"


# --- Account administration and sign-in details.


async def status_of(
    stub: pb_grpc.TwoFactorServiceAsyncStub, admin: Person, username: str
) -> pb.AccountStatus:
    answer = await stub.GetAccountStatus(
        pb.GetAccountStatusRequest(username=username), metadata=admin.metadata()
    )
    return answer.status


async def test_accounts_rights_and_protection_from_the_console(
    browser: Browser,
    server: RunningServer,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    actors: Actors,
    clock: TestClock,
) -> None:
    started = time.monotonic()
    assert server.console is not None
    url = server.console.url
    screens = Screens()
    admin = await actors.admin()
    page = await new_page(browser)
    await sign_in(page, url, admin, screens)
    await expect(page.get_by_role("heading", name="Users")).to_be_visible()

    # Create an internal account with its initial password: it starts on the allowlist.
    carol = Person(actors.name("carol"), password="an initial password 1", clock=clock)
    await page.get_by_role("link", name="Create account").click()
    await expect(page.get_by_role("heading", name="Create account")).to_be_visible()
    await expect(
        page.get_by_label("Internal: the password is held by this service")
    ).to_be_checked()
    await screens.save(page, "create-account")
    await page.get_by_label("Username").fill(carol.username)
    await page.get_by_label("Initial password").fill(carol.password)
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_role("heading", name=carol.username)).to_be_visible()
    await expect(page.get_by_role("status")).to_contain_text("is created")
    await state_shown(page, "ALLOWLISTED")
    created = await status_of(stub, admin, carol.username)
    assert created.kind == enums_pb2.ACCOUNT_KIND_INTERNAL
    assert created.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert not created.protected

    # The same name again is refused with the server's reason.
    await page.get_by_role("link", name="Users").click()
    await page.get_by_role("link", name="Create account").click()
    await page.get_by_label("Username").fill(carol.username.upper())
    await page.get_by_label("Initial password").fill(carol.password)
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_role("alert").locator(".reason")).to_have_text("ACCOUNT_EXISTS")

    # A domain account: no password asked; protected from the start.
    dave = actors.name("dave")
    await page.get_by_label("Username").fill(dave)
    await page.get_by_label("Domain: the credentials live in the directory").check()
    await expect(page.get_by_label("Initial password")).to_be_hidden()
    await page.get_by_label("Protect against unauthorized modification").check()
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_role("heading", name=dave)).to_be_visible()
    created = await status_of(stub, admin, dave)
    assert created.kind == enums_pb2.ACCOUNT_KIND_DOMAIN
    assert created.state == enums_pb2.TWO_FACTOR_STATE_ALLOWLISTED
    assert created.protected
    # A domain account's key is never deleted (the seed: internal accounts only).
    await expect(page.get_by_role("button", name="Delete secret key")).to_have_count(0)

    # carol signs in with her initial password and sets up her key.
    carol_page = await new_page(browser)
    await sign_in(carol_page, url, carol)
    await set_up_key(carol_page, carol)
    await expect(carol_page.get_by_role("heading", name=carol.username)).to_be_visible()

    # Rights, with the seed's names: grant Modify object ACLs, then revoke it.
    await open_user(page, carol.username)
    await page.get_by_role("tab", name="Rights and protection").click()
    rights = page.get_by_role("tabpanel", name="Rights and protection")
    await expect(rights.get_by_text("No rights.")).to_be_visible()
    await rights.get_by_label("Right to grant").select_option(
        label="Modify object ACLs (General features: User permissions)"
    )
    await rights.get_by_role("button", name="Grant").click()
    await expect(page.get_by_role("status")).to_contain_text("right is granted")
    row = rights.get_by_role("row").filter(has_text="General features: User permissions")
    await expect(row).to_contain_text("Modify object ACLs")
    await screens.save(page, "rights-and-protection")
    granted = await status_of(stub, admin, carol.username)
    assert [(r.functional_area, r.permission) for r in granted.rights] == [rules.ADMIN_RIGHT]
    await rights.get_by_role(
        "button", name="Revoke Modify object ACLs (General features: User permissions)"
    ).click()
    revoke = page.get_by_role("dialog", name="Revoke right")
    await expect(revoke.get_by_role("button", name="Cancel")).to_be_focused()
    await screens.save(page, "confirm-revoke")
    await revoke.get_by_role("button", name="Revoke", exact=True).click()
    await expect(page.get_by_role("status")).to_contain_text("right is revoked")
    await expect(rights.get_by_text("No rights.")).to_be_visible()
    assert list((await status_of(stub, admin, carol.username)).rights) == []

    # Protection on; then off, which the server guards with the Account protection window.
    await rights.get_by_role("button", name="Turn protection on").click()
    await expect(page.get_by_role("status")).to_contain_text("is protected")
    assert (await status_of(stub, admin, carol.username)).protected
    await rights.get_by_role("button", name="Turn protection off").click()
    protection = page.get_by_role("dialog", name="Account protection")
    await protection.get_by_label("Password").fill(admin.password)
    await protection.get_by_label("Two-factor authentication code").fill(admin.next_code())
    await protection.get_by_role("button", name="OK").click()
    await expect(page.get_by_role("status")).to_contain_text("no longer protected")
    assert not (await status_of(stub, admin, carol.username)).protected

    # The tabs answer the arrow keys, Home and End (the WAI-ARIA tabs pattern).
    rights_tab = page.get_by_role("tab", name="Rights and protection")
    two_factor_tab = page.get_by_role("tab", name="Two-factor authentication")
    await rights_tab.focus()
    await page.keyboard.press("ArrowRight")
    await expect(two_factor_tab).to_be_focused()
    await expect(two_factor_tab).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_role("tabpanel", name="Two-factor authentication")).to_be_visible()
    await page.keyboard.press("End")
    await expect(rights_tab).to_have_attribute("aria-selected", "true")

    # carol, a plain user, sees her rights and protection but may change neither, and is
    # offered no account screens.
    await carol_page.get_by_role("tab", name="Rights and protection").click()
    own = carol_page.get_by_role("tabpanel", name="Rights and protection")
    await expect(own.get_by_text("No rights.")).to_be_visible()
    await expect(own.get_by_role("button")).to_have_count(0)
    await expect(carol_page.get_by_role("link", name="Create account")).to_have_count(0)
    await screens.save(carol_page, "own-rights-and-protection")

    await page.context.close()
    await carol_page.context.close()
    elapsed = time.monotonic() - started
    assert elapsed < BROWSER_BUDGET_SECONDS, f"the browser part took {elapsed:.0f} s"


async def test_sign_in_asks_for_the_code_only_when_needed_and_sign_out_ends_the_session(
    browser: Browser,
    server: RunningServer,
    stub: pb_grpc.TwoFactorServiceAsyncStub,
    actors: Actors,
) -> None:
    assert server.console is not None
    url = server.console.url
    failed = FailedRequests()
    person = await actors.user()
    page = await new_page(browser, failed)

    # No code field until the server asks; then it appears, with no error on the way.
    await page.goto(url)
    code = page.get_by_label("Two-factor authentication code")
    await expect(code).to_be_hidden()
    await page.get_by_label("Username").fill(person.username)
    await page.get_by_label("Password").fill(person.password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(code).to_be_focused()
    await expect(page.locator(".prompt")).to_have_text(
        "Enter the code from your authenticator app, then Sign in."
    )
    await expect(page.locator(".prompt")).to_have_role("status")
    await expect(page.get_by_role("alert")).to_have_count(0)
    # A wrong code is an error, and says so.
    right = person.next_code()
    await code.fill(f"{(int(right) + 500_000) % 1_000_000:06d}")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert").locator(".reason")).to_have_text("INVALID_CREDENTIALS")
    await code.fill(right)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name=person.username)).to_be_visible()
    await expect(page.get_by_text(f"Signed in as {person.username}")).to_be_visible()

    # Sign out ends the session on the server, not only in the page.
    token = await page.evaluate("JSON.parse(sessionStorage.getItem('twofactor.session')).token")
    await sign_out(page)
    assert await page.evaluate("sessionStorage.length") == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetAccountStatus(
            pb.GetAccountStatusRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    assert error_reason(refused.value) == "UNAUTHENTICATED"

    # A code already in the field when Sign in is pressed (a password manager fills
    # one-time-code fields, hidden or not) is sent with the first press: no second step.
    await page.goto(url)
    await page.get_by_label("Username").fill(person.username)
    await page.get_by_label("Password").fill(person.password)
    await code.evaluate("(input, value) => { input.value = value; }", person.next_code())
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name=person.username)).to_be_visible()

    # The page's icon is served (no 404 for an icon on any page load).
    icon = await page.locator("link[rel=icon]").get_attribute("href")
    assert icon == "/static/favicon.svg"
    answer = await page.request.get(url.rstrip("/") + icon)
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("image/svg+xml")
    await page.context.close()
    assert failed.seen == []
