// A user's "Rights and protection" tab: the rights the account holds (grant, revoke) and its
// protection against unauthorized modification (turn on, off). Changes to a protected account
// go through the Account protection window when the server asks for it.
import { h, form } from "./dom.js";
import { Cancelled, confirmAction, withProtection } from "./dialogs.js";
import { knownRights, mayCall, permissionName, rightName, type RightName } from "./policy.js";
import { client } from "./session.js";
import type { UserPage } from "./users.js";

const key = (right: RightName) => `${right.functionalArea}\u0000${right.permission}`;

function rightsSection(page: UserPage): HTMLElement {
  const { username, actor, status } = page;
  // One's own rights are shown, not changed here: revoking one's own right would lock the
  // administrator out of this very page.
  const mayGrant = !page.own && mayCall(actor, "GrantRight");
  const mayRevoke = !page.own && mayCall(actor, "RevokeRight");
  const held = new Set(status.rights.map(key));
  const grantable = knownRights().filter((right) => !held.has(key(right)));

  const revoke = (right: RightName) =>
    void page.act(async () => {
      const sure = await confirmAction(
        "Revoke right",
        `Revoke the ${rightName(right)} right from ${username}?`,
        "Revoke",
      );
      if (!sure) throw new Cancelled("not confirmed");
      await withProtection(actor, (headers) =>
        client.revokeRight({ username, right }, { headers }),
      );
      return `The ${rightName(right)} right is revoked from ${username}.`;
    });

  const rows = status.rights.map((right) =>
    h(
      "tr",
      {},
      h("td", {}, right.functionalArea),
      h("td", {}, permissionName(right.permission)),
      mayRevoke
        ? h(
            "td",
            {},
            h(
              "button",
              {
                type: "button",
                "aria-label": `Revoke ${rightName(right)}`,
                onclick: () => revoke(right),
              },
              "Revoke",
            ),
          )
        : null,
    ),
  );

  const choice = h(
    "select",
    { id: "grant-right", required: true },
    ...grantable.map((right) => h("option", { value: key(right) }, rightName(right))),
  );
  const grant = h(
    "div",
    {},
    form(
      () =>
        page.act(async () => {
          const right = grantable.find((r) => key(r) === choice.value);
          if (right === undefined) throw new Cancelled("no right chosen");
          await withProtection(actor, (headers) =>
            client.grantRight({ username, right }, { headers }),
          );
          return `The ${rightName(right)} right is granted to ${username}.`;
        }),
      h("label", { class: "field", for: "grant-right" }, h("span", {}, "Right to grant"), choice),
      h("button", { type: "submit" }, "Grant"),
    ),
  );

  return h(
    "section",
    { "aria-labelledby": "rights-heading" },
    h("h2", { id: "rights-heading" }, "Rights"),
    rows.length
      ? h(
          "table",
          { class: "rights" },
          h("caption", { class: "visually-hidden" }, `Rights of ${username}`),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Functional area"),
              h("th", { scope: "col" }, "Right"),
              mayRevoke
                ? h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Action"))
                : null,
            ),
          ),
          h("tbody", {}, ...rows),
        )
      : h("p", {}, "No rights."),
    mayGrant && grantable.length ? grant : null,
  );
}

function protectionSection(page: UserPage): HTMLElement {
  const { username, actor, status } = page;
  const turnTo = !status.protected;
  return h(
    "section",
    { "aria-labelledby": "protection-heading" },
    h("h2", { id: "protection-heading" }, "Protection against unauthorized modification"),
    h(
      "p",
      {},
      status.protected
        ? "The account is protected: changing it asks for the credentials and a code of the " +
            "administrator who changes it (the Account protection window)."
        : "The account is not protected.",
    ),
    mayCall(actor, "SetAccountProtection")
      ? h(
          "div",
          { class: "buttons" },
          h(
            "button",
            {
              type: "button",
              onclick: () =>
                void page.act(async () => {
                  await withProtection(actor, (headers) =>
                    client.setAccountProtection({ username, protected: turnTo }, { headers }),
                  );
                  return turnTo
                    ? `${username} is protected against unauthorized modification.`
                    : `${username} is no longer protected against unauthorized modification.`;
                }),
            },
            turnTo ? "Turn protection on" : "Turn protection off",
          ),
        )
      : null,
  );
}

/** The tab's sections. */
export function rightsAndProtection(page: UserPage): HTMLElement[] {
  return [rightsSection(page), protectionSection(page)];
}
