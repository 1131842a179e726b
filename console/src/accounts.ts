// Create account: an internal account (with its initial password) or a domain account (its
// credentials live in the directory). Like `twofactor create-user`, CreateAccount puts the new
// account on the two-factor authentication allowlist: it sets up its key at its first sign-in.
import { AccountKind } from "./gen/twofactor/v1/enums_pb.js";
import { h, field, form, show } from "./dom.js";
import { refusalView } from "./errors.js";
import { authorization, client } from "./session.js";

/** `created(name, sentence)` runs once the account exists. */
export function createAccountScreen(
  root: HTMLElement,
  created: (username: string, sentence: string) => void,
): void {
  const username = field("Username", { autocomplete: "off", required: true, maxlength: "256" });
  const password = field("Initial password", {
    type: "password",
    autocomplete: "new-password",
    required: true,
    minlength: "12",
    maxlength: "1024",
    "aria-describedby": "password-hint",
  });
  const hint = h(
    "p",
    { id: "password-hint", class: "note" },
    "12 to 1024 characters. Give it to the user by a channel of its own.",
  );
  const kindChoice = (value: string, label: string, checked: boolean) => {
    const input = h("input", { type: "radio", name: "kind", value, checked });
    input.addEventListener("change", () => {
      const internal = kind() === "internal";
      passwordPart.hidden = !internal;
      password.input.required = internal;
    });
    return h("label", { class: "choice" }, input, ` ${label}`);
  };
  const kinds = h(
    "fieldset",
    {},
    h("legend", {}, "Kind"),
    kindChoice("internal", "Internal: the password is held by this service", true),
    kindChoice("domain", "Domain: the credentials live in the directory", false),
  );
  const kind = () =>
    (kinds.querySelector<HTMLInputElement>("input[name=kind]:checked")?.value ?? "internal");
  const passwordPart = h("div", {}, password.row, hint);
  const protect = h("input", { type: "checkbox", name: "protected" });
  const problems = h("div", { class: "problems" });

  show(
    root,
    h("h1", {}, "Create account"),
    form(
      async () => {
        problems.replaceChildren();
        const internal = kind() === "internal";
        const name = username.input.value.trim();
        try {
          await client.createAccount(
            {
              username: name,
              kind: internal ? AccountKind.INTERNAL : AccountKind.DOMAIN,
              password: internal ? password.input.value : "",
              protected: protect.checked,
            },
            { headers: authorization() },
          );
          created(
            name,
            `The account ${name} is created. It is on the two-factor authentication ` +
              "allowlist: it sets up its key at its first sign-in.",
          );
        } catch (error) {
          problems.replaceChildren(refusalView(error));
        }
      },
      username.row,
      kinds,
      passwordPart,
      h("label", { class: "choice" }, protect, " Protect against unauthorized modification"),
      problems,
      h(
        "div",
        { class: "buttons" },
        h("a", { href: "#/users", class: "action secondary" }, "Cancel"),
        h("button", { type: "submit" }, "Create"),
      ),
    ),
  );
  username.input.focus();
}
