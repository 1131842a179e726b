// The console's entry point: signs in, then routes between the screens by the URL's fragment
// (#/users, #/users/<name>, #/new-account, #/settings, #/audit). Screens an actor may not use
// are not offered. Entering a screen loads it afresh, also from its own menu entry.
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { createAccountScreen } from "./accounts.js";
import { auditScreen } from "./audit.js";
import { h, show } from "./dom.js";
import { reasonOf, refusalView } from "./errors.js";
import { mayCall } from "./policy.js";
import {
  authorization,
  client,
  currentSession,
  forgetSession,
  onSessionEnded,
} from "./session.js";
import { settingsScreen } from "./settings.js";
import { SessionEnded, signInScreen } from "./signin.js";
import { forgetSearch, userScreen, usersScreen } from "./users.js";

const header = document.getElementById("header")!;
const main = document.getElementById("main")!;
let actor: AccountStatus | null = null;
let leaving = new AbortController();
// A sentence for the next screen to show as done (e.g. the account just created).
let carried: string | undefined;

async function loadActor(): Promise<void> {
  const answer = await client.getAccountStatus({ username: "" }, { headers: authorization() });
  actor = answer.status!;
}

function signedOut(notice?: unknown): void {
  leaving.abort();
  forgetSession();
  forgetSearch();
  actor = null;
  header.replaceChildren();
  if (window.location.hash) history.replaceState(null, "", window.location.pathname);
  signInScreen(main, () => void start(), notice);
}

async function signOut(): Promise<void> {
  try {
    await client.signOut({}, { headers: authorization() });
    signedOut("You signed out.");
  } catch (error) {
    // The session is forgotten here all the same; say that the server did not confirm it.
    if (currentSession() !== null) signedOut(error);
  }
}

function navigation(who: AccountStatus): HTMLElement {
  const link = (href: string, text: string) => h("a", { href }, text);
  return h(
    "nav",
    { class: "main-menu", "aria-label": "Main menu" },
    h("span", { class: "product" }, "TwoFactorService"),
    mayCall(who, "ListAccounts") ? link("#/users", "Users") : null,
    link(`#/users/${encodeURIComponent(who.username)}`, "My account"),
    mayCall(who, "GetSettings") ? link("#/settings", "Administration Server properties") : null,
    mayCall(who, "ListAuditEvents") ? link("#/audit", "Audit log") : null,
    h("span", { class: "who" }, "Signed in as ", h("strong", {}, who.username)),
    h("button", { type: "button", onclick: () => void signOut() }, "Sign out"),
  );
}

/** Marks the menu entry of the screen shown (aria-current) for people and screen readers. */
function markCurrent(): void {
  for (const link of header.querySelectorAll<HTMLAnchorElement>("nav a")) {
    if (link.getAttribute("href") === window.location.hash) {
      link.setAttribute("aria-current", "page");
    } else {
      link.removeAttribute("aria-current");
    }
  }
}

async function route(): Promise<void> {
  leaving.abort();
  leaving = new AbortController();
  if (actor === null) return;
  const path = window.location.hash.replace(/^#/, "");
  const user = /^\/users\/(.+)$/.exec(path);
  const notice = carried;
  carried = undefined;
  markCurrent();
  try {
    if (user) {
      await userScreen(main, decodeURIComponent(user[1]!), actor, loadActor, notice);
    } else if (path === "/new-account" && mayCall(actor, "CreateAccount")) {
      createAccountScreen(main, (username, sentence) => {
        carried = sentence;
        window.location.hash = `#/users/${encodeURIComponent(username)}`;
      });
    } else if (path === "/settings" && mayCall(actor, "GetSettings")) {
      await settingsScreen(main, actor);
    } else if (path === "/audit" && mayCall(actor, "ListAuditEvents")) {
      await auditScreen(main, leaving.signal);
    } else if (path === "/users" && mayCall(actor, "ListAccounts")) {
      await usersScreen(main, actor);
    } else {
      // Home: the Users tab for administrators, one's own page for everyone else.
      window.location.hash = mayCall(actor, "ListAccounts")
        ? "#/users"
        : `#/users/${encodeURIComponent(actor.username)}`;
    }
  } catch (error) {
    if (actor !== null) show(main, refusalView(error));
  }
}

async function start(): Promise<void> {
  if (currentSession() === null) {
    signedOut();
    return;
  }
  try {
    await loadActor();
  } catch (error) {
    // A session that ended is handled by onSessionEnded. Otherwise the account may not use
    // the console (an account excluded from 2FA: TWO_FACTOR_NOT_CONFIGURED).
    if (reasonOf(error) !== "UNAUTHENTICATED") {
      await client.signOut({}, { headers: authorization() }).catch(() => undefined);
      signedOut(error);
    }
    return;
  }
  show(header, navigation(actor!));
  await route();
}

// A menu entry of the screen already shown fires no hashchange: load the screen again, so
// that "Users" on Users shows the accounts as they are now.
header.addEventListener("click", (event) => {
  const link = (event.target as Element).closest("a");
  if (link && link.getAttribute("href") === window.location.hash) {
    event.preventDefault();
    void route();
  }
});
onSessionEnded((why) => signedOut(new SessionEnded(why)));
window.addEventListener("hashchange", () => void route());
void start();
