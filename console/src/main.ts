// The console's entry point: signs in, then routes between the screens by the URL's fragment
// (#/users, #/users/<name>, #/settings, #/audit). Screens an actor may not use are not offered.
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { auditScreen } from "./audit.js";
import { h, show } from "./dom.js";
import { reasonOf, refusalView } from "./errors.js";
import { mayCall } from "./policy.js";
import { authorization, client, currentSession, forgetSession } from "./session.js";
import { settingsScreen } from "./settings.js";
import { signInScreen } from "./signin.js";
import { userScreen, usersScreen } from "./users.js";

const header = document.getElementById("header")!;
const main = document.getElementById("main")!;
let actor: AccountStatus | null = null;
let leaving = new AbortController();

async function loadActor(): Promise<void> {
  const answer = await client.getAccountStatus({ username: "" }, { headers: authorization() });
  actor = answer.status!;
}

function signedOut(notice?: unknown): void {
  forgetSession();
  actor = null;
  header.replaceChildren();
  if (window.location.hash) window.location.hash = "";
  signInScreen(main, () => void start(), notice);
}

async function signOut(): Promise<void> {
  try {
    await client.signOut({}, { headers: authorization() });
  } finally {
    signedOut();
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
    h("span", { class: "who" }, who.username),
    h("button", { type: "button", onclick: () => void signOut() }, "Sign out"),
  );
}

async function route(): Promise<void> {
  leaving.abort();
  leaving = new AbortController();
  if (actor === null) return;
  const path = window.location.hash.replace(/^#/, "");
  const user = /^\/users\/(.+)$/.exec(path);
  try {
    if (user) {
      await userScreen(main, decodeURIComponent(user[1]!), actor, loadActor);
    } else if (path === "/settings" && mayCall(actor, "GetSettings")) {
      await settingsScreen(main, actor);
    } else if (path === "/audit" && mayCall(actor, "ListAuditEvents")) {
      await auditScreen(main, leaving.signal);
    } else if (path === "/users" && mayCall(actor, "ListAccounts")) {
      await usersScreen(main);
    } else {
      // Home: the Users tab for administrators, one's own page for everyone else.
      window.location.hash = mayCall(actor, "ListAccounts")
        ? "#/users"
        : `#/users/${encodeURIComponent(actor.username)}`;
    }
  } catch (error) {
    show(main, refusalView(error));
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
    // The session ended (expired, signed out elsewhere, the key was reset), or the account
    // may not use the console (an account excluded from 2FA: TWO_FACTOR_NOT_CONFIGURED).
    if (reasonOf(error) === "UNAUTHENTICATED") {
      signedOut();
    } else {
      await client.signOut({}, { headers: authorization() }).catch(() => undefined);
      signedOut(error);
    }
    return;
  }
  show(header, navigation(actor!));
  await route();
}

window.addEventListener("hashchange", () => void route());
void start();
