// Modal windows: a confirmation, and the seed's "Account protection" window that asks for the
// actor's own credentials and code when the server answers STEP_UP_REQUIRED, then retries.
import type { AccountStatus } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { AccountKind } from "./gen/twofactor/v1/enums_pb.js";
import { h, field, form } from "./dom.js";
import { reasonOf, refusalView } from "./errors.js";
import { authorization } from "./session.js";

/** The person closed a window without going on. */
export class Cancelled extends Error {}

const FOCUSABLE =
  'button:not([disabled]), input:not([disabled]):not([type="hidden"]), select:not([disabled]), ' +
  'textarea:not([disabled]), a[href], [tabindex]:not([tabindex="-1"])';

/**
 * A modal window (the native <dialog>: the page behind is inert, Escape closes it). Tab and
 * Shift+Tab stay inside it; on closing, focus returns to what opened it when that still exists.
 */
let windows = 0;

function modal(title: string, ...body: HTMLElement[]): HTMLDialogElement {
  windows += 1;
  const heading = h("h2", { id: `dialog-${windows}` }, title);
  const dialog = h("dialog", { "aria-labelledby": heading.id }, heading, ...body);
  const opener = document.activeElement instanceof HTMLElement ? document.activeElement : null;
  dialog.addEventListener("keydown", (event: KeyboardEvent) => {
    if (event.key !== "Tab") return;
    const inside = [...dialog.querySelectorAll<HTMLElement>(FOCUSABLE)].filter(
      (element) => !element.closest("[hidden]"),
    );
    if (inside.length === 0) return;
    const first = inside[0]!;
    const last = inside[inside.length - 1]!;
    if (event.shiftKey && document.activeElement === first) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && document.activeElement === last) {
      event.preventDefault();
      first.focus();
    }
  });
  document.body.appendChild(dialog);
  dialog.addEventListener("close", () => {
    dialog.remove();
    if (opener?.isConnected) opener.focus();
  });
  dialog.showModal();
  return dialog;
}

/**
 * Asks to confirm an action; true when confirmed. The safe choice (Cancel) comes first and has
 * the focus, so Enter or Escape at once changes nothing.
 */
export function confirmAction(title: string, text: string, action: string): Promise<boolean> {
  return new Promise((resolve) => {
    let confirmed = false;
    const cancel = h("button", { type: "button", onclick: () => dialog.close() }, "Cancel");
    const dialog = modal(
      title,
      h("p", {}, text),
      h(
        "div",
        { class: "buttons" },
        cancel,
        h(
          "button",
          {
            type: "button",
            class: "danger",
            onclick: () => {
              confirmed = true;
              dialog.close();
            },
          },
          action,
        ),
      ),
    );
    dialog.addEventListener("close", () => resolve(confirmed));
    cancel.focus();
  });
}

interface Proof {
  password: string;
  code: string;
}

function askForProof(actor: AccountStatus, failure: unknown): Promise<Proof | null> {
  return new Promise((resolve) => {
    let proof: Proof | null = null;
    // A domain account's password is not held here: its proof is the code alone.
    const internal = actor.kind !== AccountKind.DOMAIN;
    const password = field("Password", { type: "password", autocomplete: "current-password", required: internal });
    const code = field("Two-factor authentication code", {
      inputmode: "numeric",
      autocomplete: "one-time-code",
      required: true,
    });
    const dialog = modal(
      "Account protection",
      form(
        () => {
          proof = { password: password.input.value, code: code.input.value.trim() };
          dialog.close();
        },
        h(
          "p",
          {},
          "This account is protected against unauthorized modification. Confirm that you may " +
            "change it: enter the credentials of your own account and a code from your " +
            "authenticator app.",
        ),
        failure ? refusalView(failure) : null,
        field("Your account", { value: actor.username, readonly: true }).row,
        internal ? password.row : null,
        code.row,
        h(
          "div",
          { class: "buttons" },
          h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"),
          h("button", { type: "submit" }, "OK"),
        ),
      ),
    );
    dialog.addEventListener("close", () => resolve(proof));
    (internal ? password : code).input.focus();
  });
}

/**
 * Makes a call with the session's metadata. When the server asks for step-up proof
 * (STEP_UP_REQUIRED), shows the Account protection window and retries with the proof; a
 * wrong proof (STEP_UP_FAILED) is shown in the window, which asks again.
 */
export async function withProtection<T>(
  actor: AccountStatus,
  call: (headers: Record<string, string>) => Promise<T>,
): Promise<T> {
  try {
    return await call(authorization());
  } catch (error) {
    if (reasonOf(error) !== "STEP_UP_REQUIRED") throw error;
  }
  let failure: unknown = null;
  for (;;) {
    const proof = await askForProof(actor, failure);
    if (proof === null) throw new Cancelled("the Account protection window was closed");
    const headers: Record<string, string> = { ...authorization(), "x-step-up-code": proof.code };
    if (proof.password) headers["x-step-up-password"] = proof.password;
    try {
      return await call(headers);
    } catch (error) {
      if (reasonOf(error) !== "STEP_UP_FAILED") throw error;
      failure = error;
    }
  }
}
