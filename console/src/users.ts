// Users: the accounts with search and paging, and a user's page with its Two-factor
// authentication tab (the seed's steps: Regenerate secret key for one's own account, Reset
// secret key and Delete secret key for another's).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { AccountKind, TwoFactorState } from "./gen/twofactor/v1/enums_pb.js";
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, form, show } from "./dom.js";
import { Cancelled, confirmAction, withProtection } from "./dialogs.js";
import { refusalView } from "./errors.js";
import { pendingKeyView } from "./keys.js";
import { mayCall } from "./policy.js";
import { recoveryCodesSection } from "./recovery.js";
import { authorization, client } from "./session.js";

const PAGE_SIZE = 20;

export function stateName(state: TwoFactorState): string {
  return TwoFactorState[state] ?? "UNSPECIFIED";
}

function userLink(name: string): HTMLAnchorElement {
  return h("a", { href: `#/users/${encodeURIComponent(name)}` }, name);
}

export async function usersScreen(root: HTMLElement): Promise<void> {
  const search = field("Search by name", { type: "search", autocomplete: "off" });
  const rows = h("tbody");
  const problems = h("div", { class: "problems" });
  const previous = h("button", { type: "button", disabled: true }, "Previous page");
  const next = h("button", { type: "button", disabled: true }, "Next page");
  // Tokens of the pages seen so far, to go back: AIP-132 tokens only lead forward.
  let tokens: string[] = [""];
  let page = 0;

  const load = async () => {
    problems.replaceChildren();
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
            h("td", {}, AccountKind[account.kind] ?? ""),
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
    form(() => {
      tokens = [""];
      page = 0;
      return load();
    }, search.row, h("button", { type: "submit" }, "Search")),
    problems,
    h(
      "table",
      { class: "accounts" },
      h(
        "thead",
        {},
        h("tr", {}, h("th", {}, "Name"), h("th", {}, "Kind"), h("th", {}, "Two-factor state"), h("th", {}, "Protection")),
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
    ...row("Kind", AccountKind[status.kind] ?? ""),
    ...row("Secret key created", when(status.keyCreateTime)),
    ...row("On the 2FA allowlist", status.allowlisted ? "yes" : "no"),
    ...row("On the exclusion list", status.excluded ? "yes" : "no"),
    ...row(
      "Protected against unauthorized modification",
      status.protected ? "yes" : "no",
    ),
    ...row("Consecutive failures", String(status.consecutiveFailures)),
    ...row("Locked until", when(status.lockedUntil)),
    ...row("Recovery codes left", String(status.recoveryCodesRemaining)),
  );
}

/** A user's page; `actor` is the signed-in account, `refreshActor` reloads its status. */
export async function userScreen(
  root: HTMLElement,
  username: string,
  actor: AccountStatus,
  refreshActor: () => Promise<void>,
): Promise<void> {
  const own = username.toLowerCase() === actor.username.toLowerCase();
  const tab = h("section", { class: "tab", "aria-label": "Two-factor authentication" });
  const notices = h("div", { class: "problems" });
  show(
    root,
    h("h1", {}, username),
    h("nav", { class: "tabs" }, h("span", { class: "current" }, "Two-factor authentication")),
    notices,
    tab,
  );

  const render = async () => {
    let status: AccountStatus;
    try {
      const answer = await client.getAccountStatus(
        { username: own ? "" : username },
        { headers: authorization() },
      );
      status = answer.status!;
    } catch (error) {
      show(tab, refusalView(error));
      return;
    }
    const act = async (work: () => Promise<string>) => {
      notices.replaceChildren();
      try {
        notices.replaceChildren(h("p", { class: "done", role: "status" }, await work()));
        await render();
      } catch (error) {
        if (!(error instanceof Cancelled)) notices.replaceChildren(refusalView(error));
      }
    };
    const buttons: HTMLElement[] = [];
    if (own && mayCall(actor, "BeginRegenerateSecret", true)) {
      buttons.push(
        h("button", { type: "button", onclick: () => void regenerate() }, "Regenerate secret key"),
      );
    }
    if (!own && mayCall(actor, "ResetSecret")) {
      buttons.push(
        h(
          "button",
          {
            type: "button",
            onclick: () =>
              void act(async () => {
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
    if (!own && status.kind === AccountKind.INTERNAL && mayCall(actor, "DeleteSecret")) {
      buttons.push(
        h(
          "button",
          {
            type: "button",
            class: "danger",
            onclick: () =>
              void act(async () => {
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
    const recovery =
      own && status.state === TwoFactorState.ENROLLED && mayCall(actor, "GenerateRecoveryCodes", true)
        ? recoveryCodesSection(actor, status, () => void render())
        : null;
    show(tab, statusList(status), h("div", { class: "buttons" }, ...buttons), recovery);

    async function regenerate(): Promise<void> {
      notices.replaceChildren();
      try {
        const begun = await withProtection(actor, (headers) =>
          client.beginRegenerateSecret({}, { headers }),
        );
        show(
          tab,
          pendingKeyView(begun.pendingKey!, async (code) => {
            await withProtection(actor, (headers) =>
              client.confirmRegenerateSecret({ code }, { headers }),
            );
            await refreshActor();
            notices.replaceChildren(
              h("p", { class: "done", role: "status" }, "The secret key for your account is changed."),
            );
            await render();
          }),
          h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => void render() }, "Cancel")),
        );
      } catch (error) {
        if (!(error instanceof Cancelled)) notices.replaceChildren(refusalView(error));
      }
    }
  };
  await render();
}
