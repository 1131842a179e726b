// Sign in: username and password; the code field appears only when the server asks for it
// (CODE_REQUIRED), which is a step of the normal path, not an error. A code already in the
// field (a password manager fills one-time-code fields) is sent with the first press. An
// allowlisted account gets the first-time setup; a refusal shows the server's reason (a
// BLOCKED account: TWO_FACTOR_KEY_DELETED).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { SignInOutcome } from "./gen/twofactor/v1/enums_pb.js";
import type { Session as SessionMessage } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, focusOn, form, show } from "./dom.js";
import { reasonOf, refusalView } from "./errors.js";
import { pendingKeyView } from "./keys.js";
import { client, keepSession } from "./session.js";

/** A session that ended without the person asking: said at once (an alert). */
export class SessionEnded {
  constructor(readonly why: string) {}
}

/**
 * The Sign in screen. `notice` says why the last session ended: SessionEnded, a sentence (a
 * status: "You signed out."), or a refusal of the server (an alert).
 */
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
  const prompt = h("p", { class: "prompt", role: "status" });
  const problems = h(
    "div",
    { class: "problems" },
    notice instanceof SessionEnded
      ? h("p", { class: "notice", role: "alert" }, notice.why)
      : typeof notice === "string"
        ? h("p", { class: "notice", role: "status" }, notice)
        : notice
          ? refusalView(notice)
          : null,
  );

  const opened = (session: SessionMessage | undefined) => {
    if (!session) throw new Error("the server opened no session");
    keepSession({
      token: session.token,
      username: username.input.value.trim(),
      expiresAt: session.expireTime ? timestampDate(session.expireTime).getTime() : 0,
    });
    signedIn();
  };

  const submit = async () => {
    problems.replaceChildren();
    try {
      const answer = await client.signIn({
        username: username.input.value.trim(),
        password: password.input.value,
        code: code.input.value.trim(),
      });
      if (answer.outcome === SignInOutcome.ENROLLMENT_REQUIRED && answer.enrollment) {
        const ticket = answer.enrollment.enrollmentTicket;
        const heading = h("h1", {}, "First sign-in: set up two-factor authentication");
        show(
          root,
          heading,
          pendingKeyView(answer.enrollment.pendingKey!, async (value) => {
            const done = await client.completeEnrollment({ enrollmentTicket: ticket, code: value });
            opened(done.session);
          }),
        );
        focusOn(heading);
        return;
      }
      opened(answer.session);
    } catch (error) {
      if (reasonOf(error) === "CODE_REQUIRED" && code.row.hidden) {
        // The account has a key: the next step of signing in, not a failure.
        code.row.hidden = false;
        code.input.required = true;
        prompt.textContent = "Enter the code from your authenticator app, then Sign in.";
        code.input.focus();
        return;
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
      prompt,
      problems,
      h("button", { type: "submit" }, "Sign in"),
    ),
  );
  username.input.focus();
}
