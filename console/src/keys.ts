// A pending key as the seed's "Two-factor authentication" window shows it, step by step:
// "View how to set up two-factor authentication", then "View QR code" (the QR code to scan and
// the secret as text for manual entry), then the code and "Check and apply".
import type { PendingKey } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, focusOn, form } from "./dom.js";
import { refusalView } from "./errors.js";

/** The key's panel; `apply(code)` runs on Check and apply and throws to show a refusal. */
export function pendingKeyView(
  key: PendingKey,
  apply: (code: string) => Promise<void>,
  heading = "Two-factor authentication",
): HTMLElement {
  const picture = URL.createObjectURL(
    new Blob([key.qrCodePng as Uint8Array<ArrayBuffer>], { type: "image/png" }),
  );
  const code = field("Code from the authenticator app", {
    inputmode: "numeric",
    autocomplete: "one-time-code",
    required: true,
  });
  const problems = h("div", { class: "problems" });
  const grouped = key.secretBase32.replace(/(.{4})/g, "$1 ").trim();
  const expires = key.expireTime
    ? new Date(Number(key.expireTime.seconds) * 1000).toLocaleTimeString()
    : "";

  const qrHeading = h("h3", {}, "Scan the QR code");
  const qrStep = h(
    "div",
    { class: "step", hidden: true },
    qrHeading,
    h("img", { class: "qr", src: picture, alt: "QR code of the new secret key" }),
    h(
      "dl",
      {},
      h("dt", {}, "Secret key (for manual entry)"),
      h("dd", { class: "secret" }, grouped),
      h("dt", {}, "Parameters"),
      h("dd", {}, `${key.algorithm}, ${key.digits} digits, every ${key.periodSeconds} s`),
      h("dt", {}, "Expires"),
      h("dd", {}, expires),
    ),
    form(
      async () => {
        problems.replaceChildren();
        try {
          await apply(code.input.value.trim());
          URL.revokeObjectURL(picture);
        } catch (error) {
          problems.replaceChildren(refusalView(error));
        }
      },
      code.row,
      problems,
      h("button", { type: "submit" }, "Check and apply"),
    ),
  );
  const viewQrCode = h(
    "button",
    {
      type: "button",
      onclick: () => {
        viewQrCode.hidden = true;
        qrStep.hidden = false;
        focusOn(qrHeading);
      },
    },
    "View QR code",
  );
  const howHeading = h("h3", {}, "How to set up two-factor authentication");
  const howStep = h(
    "div",
    { class: "step", hidden: true },
    howHeading,
    h(
      "ol",
      {},
      h("li", {}, "Open an authenticator app on your mobile device (any app for TOTP codes)."),
      h(
        "li",
        {},
        "Click View QR code and scan it with the app, or type the secret key shown under it.",
      ),
      h(
        "li",
        {},
        "Enter the one-time security code the app generates and click Check and apply.",
      ),
    ),
    viewQrCode,
  );
  const viewHow = h(
    "button",
    {
      type: "button",
      onclick: () => {
        viewHow.hidden = true;
        howStep.hidden = false;
        focusOn(howHeading);
      },
    },
    "View how to set up two-factor authentication",
  );
  return h(
    "section",
    { class: "pending-key", "aria-label": heading },
    h("h2", {}, heading),
    h(
      "p",
      {},
      "A new secret key is ready. Set it up in the authenticator app on your mobile device " +
        `before ${expires || "it expires"}.`,
    ),
    viewHow,
    howStep,
    qrStep,
  );
}
