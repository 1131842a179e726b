// Administration Server properties: the issuer name, the two-factor authentication allowlist
// and the exclusion list (add, remove).
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, form, show } from "./dom.js";
import { Cancelled, withProtection } from "./dialogs.js";
import { refusalView } from "./errors.js";
import { mayCall } from "./policy.js";
import { authorization, client } from "./session.js";
import { stateName } from "./users.js";

type ListName = "allowlist" | "exclusion";

interface ListCalls {
  title: string;
  explanation: string;
  list: (pageToken: string) => Promise<{ accounts: AccountStatus[]; nextPageToken: string }>;
  add: (username: string, headers: Record<string, string>) => Promise<unknown>;
  remove: (username: string, headers: Record<string, string>) => Promise<unknown>;
  addRpc: string;
  removeRpc: string;
}

const LISTS: Record<ListName, ListCalls> = {
  allowlist: {
    title: "Two-factor authentication allowlist",
    explanation:
      "Accounts without a key that may set one up at their next sign-in. Adding an account " +
      "whose key was deleted restores its access.",
    list: (pageToken) =>
      client.listAllowlist({ pageSize: 100, pageToken }, { headers: authorization() }),
    add: (username, headers) => client.addToAllowlist({ username }, { headers }),
    remove: (username, headers) => client.removeFromAllowlist({ username }, { headers }),
    addRpc: "AddToAllowlist",
    removeRpc: "RemoveFromAllowlist",
  },
  exclusion: {
    title: "Exclusion list",
    explanation:
      "Accounts that sign in without two-factor authentication (service accounts). Adding " +
      "an account deletes its key.",
    list: (pageToken) =>
      client.listExclusionList({ pageSize: 100, pageToken }, { headers: authorization() }),
    add: (username, headers) => client.addToExclusionList({ username }, { headers }),
    remove: (username, headers) => client.removeFromExclusionList({ username }, { headers }),
    addRpc: "AddToExclusionList",
    removeRpc: "RemoveFromExclusionList",
  },
};

function listSection(name: ListName, actor: AccountStatus): HTMLElement {
  const calls = LISTS[name];
  const rows = h("tbody");
  const problems = h("div", { class: "problems" });
  const newName = field("Account name", { autocomplete: "off", required: true });

  const act = async (work: (headers: Record<string, string>) => Promise<unknown>) => {
    problems.replaceChildren();
    try {
      await withProtection(actor, work);
      await load();
      return true;
    } catch (error) {
      if (!(error instanceof Cancelled)) problems.replaceChildren(refusalView(error));
      return false;
    }
  };

  const load = async () => {
    const accounts: AccountStatus[] = [];
    let token = "";
    do {
      const page = await calls.list(token);
      accounts.push(...page.accounts);
      token = page.nextPageToken;
    } while (token);
    rows.replaceChildren(
      ...accounts.map((account) =>
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: `#/users/${encodeURIComponent(account.username)}` }, account.username)),
          h("td", { class: "state" }, stateName(account.state)),
          h(
            "td",
            {},
            mayCall(actor, calls.removeRpc)
              ? h(
                  "button",
                  {
                    type: "button",
                    "aria-label": `Remove ${account.username}`,
                    onclick: () => void act((headers) => calls.remove(account.username, headers)),
                  },
                  "Remove",
                )
              : null,
          ),
        ),
      ),
    );
    if (accounts.length === 0) rows.replaceChildren(h("tr", {}, h("td", { colspan: "3" }, "Empty.")));
  };

  const section = h(
    "section",
    { class: "list", "aria-label": calls.title },
    h("h2", {}, calls.title),
    h("p", {}, calls.explanation),
    // Before the list, so that a long list does not stand between a keyboard user and it.
    mayCall(actor, calls.addRpc)
      ? form(
          async () => {
            if (await act((headers) => calls.add(newName.input.value.trim(), headers))) {
              newName.input.value = "";
            }
          },
          newName.row,
          h("button", { type: "submit" }, "Add"),
        )
      : null,
    problems,
    h(
      "table",
      {},
      h("caption", { class: "visually-hidden" }, calls.title),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Name"),
          h("th", { scope: "col" }, "State"),
          h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Action")),
        ),
      ),
      rows,
    ),
  );
  load().catch((error: unknown) => problems.replaceChildren(refusalView(error)));
  return section;
}

/** How far from the current code a code is still accepted, in words. */
function tolerance(steps: number, periodSeconds: number): string {
  if (steps === 0) return "Only the current code is accepted.";
  const which =
    steps === 1 ? "the code just before and just after" : `up to ${steps} codes before and after`;
  return (
    `Besides the current code, ${which} it are accepted, for clocks up to ` +
    `${steps * periodSeconds} s apart.`
  );
}

export async function settingsScreen(root: HTMLElement, actor: AccountStatus): Promise<void> {
  const general = h("section", { "aria-label": "General" }, h("h2", {}, "General"));
  show(
    root,
    h("h1", {}, "Administration Server properties"),
    general,
    listSection("allowlist", actor),
    listSection("exclusion", actor),
  );
  try {
    const { settings } = await client.getSettings({}, { headers: authorization() });
    const issuer = field("Issuer name", { value: settings!.issuerName, required: true, maxlength: "64" });
    const problems = h("div", { class: "problems" });
    general.append(
      form(
        async () => {
          problems.replaceChildren();
          try {
            await client.updateSettings(
              { issuerName: issuer.input.value.trim() },
              { headers: authorization() },
            );
            problems.replaceChildren(h("p", { class: "done", role: "status" }, "Saved."));
          } catch (error) {
            problems.replaceChildren(refusalView(error));
          }
        },
        issuer.row,
        mayCall(actor, "UpdateSettings") ? h("button", { type: "submit" }, "Save") : null,
        problems,
      ),
      h(
        "p",
        { class: "note" },
        `New keys: ${settings!.totpAlgorithm}, ${settings!.totpDigits} digits, a new code ` +
          `every ${settings!.totpPeriodSeconds} s. ` +
          `${tolerance(settings!.totpValidWindow, settings!.totpPeriodSeconds)} ` +
          "(The server's configuration.)",
      ),
    );
  } catch (error) {
    general.append(refusalView(error));
  }
}
