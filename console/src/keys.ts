// A pending key as the seed's "Two-factor authentication" window shows it: the QR code to
// scan, the secret as text for manual entry, and a code to "Check and apply".
import type { PendingKey } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, form } from "./dom.js";
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
  return h(
    "section",
    { class: "pending-key", "aria-label": heading },
    h("h2", {}, heading),
    h(
      "p",
      {},
      "Scan the QR code with the authenticator app on your mobile device, or type in the " +
        "secret key. Then enter the code the app shows and click Check and apply.",
    ),
    h("img", { class: "qr", src: picture, alt: "QR code of the new secret key" }),
    h(
      "dl",
      {},
      h("dt", {}, "Secret key"),
      h("dd", { class: "secret" }, grouped),
      h("dt", {}, "Parameters"),
      h("dd", {}, `${key.algorithm}, ${key.digits} digits, every ${key.periodSeconds} s`),
      h("dt", {}, "Expires"),
      h("dd", {}, expires),
    ),
    form(async () => {
      problems.replaceChildren();
      try {
        await apply(code.input.value.trim());
        URL.revokeObjectURL(picture);
      } catch (error) {
        problems.replaceChildren(refusalView(error));
      }
    }, code.row, problems, h("button", { type: "submit" }, "Check and apply")),
  );
}
