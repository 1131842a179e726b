// Recovery codes (O11) on one's own page: how many are left (with a warning when few are), a
// new set made with a current code (and the Account protection window where the account is
// protected), shown once, and downloaded as a text file. The server keeps only their hashes.
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, form, show } from "./dom.js";
import { Cancelled, confirmAction, withProtection } from "./dialogs.js";
import { refusalView } from "./errors.js";
import { client } from "./session.js";

/** At or below this many unused codes the section warns (Keycloak's default threshold is 4). */
export const FEW_CODES_LEFT = 3;

function remainingText(remaining: number): HTMLElement {
  if (remaining === 0) {
    return h(
      "p",
      { class: "remaining" },
      "You have no recovery codes. Generate a set and keep it somewhere safe: each code signs " +
        "you in once, in place of a code from your authenticator app, if you lose it.",
    );
  }
  const text = `${remaining} recovery ${remaining === 1 ? "code is" : "codes are"} left.`;
  if (remaining <= FEW_CODES_LEFT) {
    return h(
      "p",
      { class: "remaining warning", role: "status" },
      `${text} Only a few are left: generate a new set.`,
    );
  }
  return h("p", { class: "remaining" }, text);
}

/** The codes as a text file: what the Download button saves. */
export function codesFile(username: string, codes: readonly string[]): string {
  return [
    `Recovery codes for ${username} (TwoFactorService)`,
    `Made ${new Date().toISOString()}. Each code signs you in once, in place of a code from`,
    "your authenticator app. Generating a new set makes these void.",
    "",
    ...codes,
    "",
  ].join("\n");
}

function download(username: string, codes: readonly string[]): void {
  const file = new Blob([codesFile(username, codes)], { type: "text/plain;charset=utf-8" });
  const link = h("a", {
    href: URL.createObjectURL(file),
    download: `recovery-codes-${username}.txt`,
  });
  document.body.appendChild(link);
  link.click();
  link.remove();
  // The object URL is released once the download has been handed to the browser.
  setTimeout(() => URL.revokeObjectURL(link.href), 0);
}

function shownOnce(
  section: HTMLElement,
  actor: AccountStatus,
  codes: readonly string[],
  done: () => void,
): void {
  show(
    section,
    h("h2", {}, "Recovery codes"),
    h(
      "p",
      { role: "status" },
      `Your new recovery codes: save them now, they are shown only this once. Your old codes ` +
        "no longer work.",
    ),
    h("ol", { class: "recovery-codes", "aria-label": "New recovery codes" },
      ...codes.map((code) => h("li", { class: "secret" }, code))),
    h(
      "div",
      { class: "buttons" },
      h("button", { type: "button", onclick: () => download(actor.username, codes) }, "Download as text"),
      h("button", { type: "button", onclick: done }, "Done"),
    ),
  );
}

/**
 * The Recovery codes section of one's own page. `status` is one's own status (the count left);
 * `refresh` re-renders the page once the new codes have been put away.
 */
export function recoveryCodesSection(
  actor: AccountStatus,
  status: AccountStatus,
  refresh: () => void,
): HTMLElement {
  const section = h("section", { class: "recovery", "aria-label": "Recovery codes" });
  const code = field("Current code from the authenticator app", {
    inputmode: "numeric",
    autocomplete: "one-time-code",
    required: true,
  });
  const problems = h("div", { class: "problems" });
  const generate = async () => {
    problems.replaceChildren();
    try {
      if (status.recoveryCodesRemaining > 0) {
        const sure = await confirmAction(
          "Generate new recovery codes",
          "Generate a new set of recovery codes? The codes you have now stop working.",
          "Generate",
        );
        if (!sure) return;
      }
      const answer = await withProtection(actor, (headers) =>
        client.generateRecoveryCodes({ code: code.input.value.trim() }, { headers }),
      );
      shownOnce(section, actor, answer.recoveryCodes, refresh);
    } catch (error) {
      if (!(error instanceof Cancelled)) problems.replaceChildren(refusalView(error));
    }
  };
  show(
    section,
    h("h2", {}, "Recovery codes"),
    remainingText(status.recoveryCodesRemaining),
    form(
      generate,
      code.row,
      problems,
      h("button", { type: "submit" }, "Generate new recovery codes"),
    ),
  );
  return section;
}
