// Sign in: username and password, then the code when the server asks for it
// (CODE_REQUIRED); a first-time setup when the account is on the allowlist; and the server's
// reason when it refuses (a BLOCKED account: TWO_FACTOR_KEY_DELETED).
import { SignInOutcome } from "./gen/twofactor/v1/enums_pb.js";
import type { Session as SessionMessage } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, form, show } from "./dom.js";
import { reasonOf, refusalView } from "./errors.js";
import { pendingKeyView } from "./keys.js";
import { client, keepSession } from "./session.js";

/** The Sign in screen; `notice` is a refusal to show first (why the last session ended). */
export function signInScreen(root: HTMLElement, signedIn: () => void, notice?: unknown): void {
  const username = field("Username", { autocomplete: "username", required: true });
  const password = field("Password", {
    type: "password",
    autocomplete: "current-password",
    required: true,
  });
  const code = field("Two-factor authentication code", {
    inputmode: "numeric",
    autocomplete: "one-time-code",
  });
  code.row.hidden = true;
  const problems = h("div", { class: "problems" }, notice ? refusalView(notice) : null);

  const opened = (session: SessionMessage | undefined) => {
    if (!session) throw new Error("the server opened no session");
    keepSession({ token: session.token, username: username.input.value.trim() });
    signedIn();
  };

  const submit = async () => {
    problems.replaceChildren();
    try {
      const answer = await client.signIn({
        username: username.input.value.trim(),
        password: password.input.value,
        code: code.row.hidden ? "" : code.input.value.trim(),
      });
      if (answer.outcome === SignInOutcome.ENROLLMENT_REQUIRED && answer.enrollment) {
        const ticket = answer.enrollment.enrollmentTicket;
        show(
          root,
          h("h1", {}, "First sign-in: set up two-factor authentication"),
          pendingKeyView(answer.enrollment.pendingKey!, async (value) => {
            const done = await client.completeEnrollment({ enrollmentTicket: ticket, code: value });
            opened(done.session);
          }),
        );
        return;
      }
      opened(answer.session);
    } catch (error) {
      if (reasonOf(error) === "CODE_REQUIRED" && code.row.hidden) {
        code.row.hidden = false;
        code.input.required = true;
        code.input.focus();
      }
      problems.replaceChildren(refusalView(error));
    }
  };

  show(
    root,
    h("h1", {}, "Sign in"),
    form(
      submit,
      username.row,
      password.row,
      code.row,
      problems,
      h("button", { type: "submit" }, "Sign in"),
    ),
  );
  username.input.focus();
}
