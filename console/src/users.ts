// Users: the accounts with search and paging, and a user's page with its tabs: Two-factor
// authentication (the seed's steps: Regenerate secret key for one's own account, Reset secret
// key and Delete secret key for another's) and Rights and protection.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { AccountKind, TwoFactorState } from "./gen/twofactor/v1/enums_pb.js";
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, focusOn, form, show, tabs } from "./dom.js";
import { Cancelled, confirmAction, withProtection } from "./dialogs.js";
import { refusalView } from "./errors.js";
import { pendingKeyView } from "./keys.js";
import { mayCall } from "./policy.js";
import { recoveryCodesSection } from "./recovery.js";
import { rightsAndProtection } from "./rights.js";
import { authorization, client } from "./session.js";

const PAGE_SIZE = 20;

export function stateName(state: TwoFactorState): string {
  return TwoFactorState[state] ?? "UNSPECIFIED";
}

export function kindName(kind: AccountKind): string {
  return AccountKind[kind] ?? "";
}

function userLink(name: string): HTMLAnchorElement {
  return h("a", { href: `#/users/${encodeURIComponent(name)}` }, name);
}

// The last search typed on Users, kept while this tab's session lasts: entering Users (also
// from its own menu entry) lists the accounts as they are now, for the same search.
let lastSearch = "";

export function forgetSearch(): void {
  lastSearch = "";
}

export async function usersScreen(root: HTMLElement, actor: AccountStatus): Promise<void> {
  const search = field("Search by name", {
    type: "search",
    autocomplete: "off",
    value: lastSearch,
  });
  const rows = h("tbody");
  const problems = h("div", { class: "problems" });
  const previous = h("button", { type: "button", disabled: true }, "Previous page");
  const next = h("button", { type: "button", disabled: true }, "Next page");
  // Tokens of the pages seen so far, to go back: AIP-132 tokens only lead forward.
  let tokens: string[] = [""];
  let page = 0;

  const load = async () => {
    problems.replaceChildren();
    lastSearch = search.input.value;
    try {
      const answer = await client.listAccounts(
        { usernamePrefix: search.input.value.trim(), pageSize: PAGE_SIZE, pageToken: tokens[page] },
        { headers: authorization() },
      );
      rows.replaceChildren(
        ...answer.accounts.map((account) =>
          h(
            "tr",
            {},
            h("td", {}, userLink(account.username)),
            h("td", {}, kindName(account.kind)),
            h("td", { class: "state" }, stateName(account.state)),
            h("td", {}, account.protected ? "protected" : ""),
          ),
        ),
      );
      if (answer.accounts.length === 0) {
        rows.replaceChildren(h("tr", {}, h("td", { colspan: "4" }, "No accounts found.")));
      }
      tokens = tokens.slice(0, page + 1);
      if (answer.nextPageToken) tokens.push(answer.nextPageToken);
      previous.disabled = page === 0;
      next.disabled = tokens.length <= page + 1;
    } catch (error) {
      problems.replaceChildren(refusalView(error));
    }
  };
  previous.addEventListener("click", () => {
    page -= 1;
    void load();
  });
  next.addEventListener("click", () => {
    page += 1;
    void load();
  });

  show(
    root,
    h("h1", {}, "Users"),
    mayCall(actor, "CreateAccount")
      ? h("p", {}, h("a", { href: "#/new-account", class: "action" }, "Create account"))
      : null,
    form(
      () => {
        tokens = [""];
        page = 0;
        return load();
      },
      search.row,
      h("button", { type: "submit" }, "Search"),
    ),
    problems,
    h(
      "table",
      { class: "accounts" },
      h("caption", { class: "visually-hidden" }, "Accounts"),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Name"),
          h("th", { scope: "col" }, "Kind"),
          h("th", { scope: "col" }, "Two-factor state"),
          h("th", { scope: "col" }, "Protection"),
        ),
      ),
      rows,
    ),
    h("div", { class: "buttons" }, previous, next),
  );
  await load();
}

function statusList(status: AccountStatus): HTMLElement {
  const when = (value: Parameters<typeof timestampDate>[0] | undefined) =>
    value ? timestampDate(value).toLocaleString() : "—";
  const row = (name: string, value: string) => [h("dt", {}, name), h("dd", {}, value)];
  return h(
    "dl",
    { class: "status" },
    ...row("State", stateName(status.state)),
    ...row("Kind", kindName(status.kind)),
    ...row("Secret key created", when(status.keyCreateTime)),
    ...row("On the 2FA allowlist", status.allowlisted ? "yes" : "no"),
    ...row("On the exclusion list", status.excluded ? "yes" : "no"),
    ...row("Protected against unauthorized modification", status.protected ? "yes" : "no"),
    ...row("Consecutive failures", String(status.consecutiveFailures)),
    ...row("Locked until", when(status.lockedUntil)),
    ...row("Recovery codes left", String(status.recoveryCodesRemaining)),
  );
}

/** What the parts of a user's page work with. */
export interface UserPage {
  username: string;
  /** The page is the signed-in account's own. */
  own: boolean;
  /** The account's status as last loaded. */
  status: AccountStatus;
  /** The signed-in account. */
  actor: AccountStatus;
  /** Runs a change: shows what it returns as done (or its refusal), then reloads the page. */
  act: (work: () => Promise<string>) => Promise<void>;
  /** Shows `content` in place of the tab's usual content until `render` runs. */
  replaceTab: (...content: HTMLElement[]) => void;
  /** Reloads the account's status and shows the page again. */
  render: () => Promise<void>;
  /** Shows a sentence as done. */
  done: (text: string) => void;
  refreshActor: () => Promise<void>;
}

/** Regenerate secret key, on one's own page (the seed's steps 3.1 to 3.4). */
function regenerateSection(page: UserPage): HTMLElement | null {
  if (!mayCall(page.actor, "BeginRegenerateSecret", true)) return null;
  const regenerate = async () => {
    try {
      const begun = await withProtection(page.actor, (headers) =>
        client.beginRegenerateSecret({}, { headers }),
      );
      const panel = pendingKeyView(begun.pendingKey!, async (code) => {
        await withProtection(page.actor, (headers) =>
          client.confirmRegenerateSecret({ code }, { headers }),
        );
        await page.refreshActor();
        page.done("The secret key for your account is changed.");
        await page.render();
      });
      page.replaceTab(
        panel,
        h(
          "div",
          { class: "buttons" },
          h("button", { type: "button", onclick: () => void page.render() }, "Cancel"),
        ),
      );
      focusOn(panel.querySelector("h2")!);
    } catch (error) {
      if (!(error instanceof Cancelled)) throw error;
    }
  };
  return h(
    "div",
    { class: "buttons" },
    h(
      "button",
      {
        type: "button",
        onclick: () =>
          void page.act(async () => {
            await regenerate();
            return "";
          }),
      },
      "Regenerate secret key",
    ),
  );
}

/** Reset secret key and Delete secret key, on another account's page (steps 4 and Delete). */
function resetAndDeleteSection(page: UserPage): HTMLElement | null {
  const { username, actor, status } = page;
  const buttons: HTMLElement[] = [];
  if (mayCall(actor, "ResetSecret")) {
    buttons.push(
      h(
        "button",
        {
          type: "button",
          onclick: () =>
            void page.act(async () => {
              const sure = await confirmAction(
                "Reset secret key",
                `Reset the secret key of ${username}? The key is deleted and the account is ` +
                  "added to the two-factor authentication allowlist: it sets up a new key at " +
                  "its next sign-in.",
                "Reset",
              );
              if (!sure) throw new Cancelled("not confirmed");
              await withProtection(actor, (headers) =>
                client.resetSecret({ username }, { headers }),
              );
              return `The secret key of ${username} is reset.`;
            }),
        },
        "Reset secret key",
      ),
    );
  }
  // Delete: internal accounts only, never one's own (the seed's rule of the page).
  if (status.kind === AccountKind.INTERNAL && mayCall(actor, "DeleteSecret")) {
    buttons.push(
      h(
        "button",
        {
          type: "button",
          class: "danger",
          onclick: () =>
            void page.act(async () => {
              const sure = await confirmAction(
                "Delete secret key",
                `Delete the secret key of ${username}? The account is blocked from signing ` +
                  "in until it is added to the two-factor authentication allowlist.",
                "Delete",
              );
              if (!sure) throw new Cancelled("not confirmed");
              await withProtection(actor, (headers) =>
                client.deleteSecret({ username }, { headers }),
              );
              return `The secret key of ${username} is deleted.`;
            }),
        },
        "Delete secret key",
      ),
    );
  }
  return buttons.length ? h("div", { class: "buttons" }, ...buttons) : null;
}

/**
 * The parts of the Two-factor authentication tab below the status, in order. One's own page
 * and another account's page each have their list; a new part is one more function here.
 */
/** Recovery codes, on one's own page once a key is set up (recovery.ts). */
function recoverySection(page: UserPage): HTMLElement | null {
  if (page.status.state !== TwoFactorState.ENROLLED) return null;
  if (!mayCall(page.actor, "GenerateRecoveryCodes", true)) return null;
  return recoveryCodesSection(page.actor, page.status, () => void page.render());
}

const OWN_PAGE_PARTS: Array<(page: UserPage) => HTMLElement | null> = [
  regenerateSection,
  recoverySection,
];
const OTHER_PAGE_PARTS: Array<(page: UserPage) => HTMLElement | null> = [resetAndDeleteSection];

/**
 * A user's page; `actor` is the signed-in account, `refreshActor` reloads its status, `notice`
 * is a sentence to show as done (what the screen before did).
 */
export async function userScreen(
  root: HTMLElement,
  username: string,
  actor: AccountStatus,
  refreshActor: () => Promise<void>,
  notice?: string,
): Promise<void> {
  const own = username.toLowerCase() === actor.username.toLowerCase();
  const twoFactorTab = h("div", { class: "tab" });
  const rightsTab = h("div", { class: "tab" });
  const notices = h("div", { class: "problems" });
  const done = (text: string) => {
    if (text) notices.replaceChildren(h("p", { class: "done", role: "status" }, text));
  };
  show(
    root,
    h("h1", {}, username),
    notices,
    tabs("User properties", [
      { id: "two-factor", title: "Two-factor authentication", panel: twoFactorTab },
      { id: "rights", title: "Rights and protection", panel: rightsTab },
    ]),
  );
  if (notice) done(notice);

  const render = async (): Promise<void> => {
    let status: AccountStatus;
    try {
      const answer = await client.getAccountStatus(
        { username: own ? "" : username },
        { headers: authorization() },
      );
      status = answer.status!;
    } catch (error) {
      show(twoFactorTab, refusalView(error));
      rightsTab.replaceChildren();
      return;
    }
    const page: UserPage = {
      username,
      own,
      status,
      actor,
      render,
      done,
      refreshActor,
      replaceTab: (...content) => show(twoFactorTab, ...content),
      act: async (work) => {
        notices.replaceChildren();
        try {
          const result = await work();
          if (result) {
            done(result);
            await render();
            // The buttons were drawn anew: keep the keyboard's place at the news.
            focusOn(notices);
          }
        } catch (error) {
          if (!(error instanceof Cancelled)) notices.replaceChildren(refusalView(error));
        }
      },
    };
    const parts = (own ? OWN_PAGE_PARTS : OTHER_PAGE_PARTS).map((part) => part(page));
    show(twoFactorTab, statusList(status), ...parts);
    show(rightsTab, ...rightsAndProtection(page));
  };
  await render();
}
