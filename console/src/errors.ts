// Refusals as the server states them: the google.rpc.ErrorInfo reason and the message, and
// how long to wait from RetryInfo.
import { ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { h } from "./dom.js";

export interface Refusal {
  reason: string;
  message: string;
  retryAfterSeconds: number | null;
}

export function refusal(error: unknown): Refusal {
  const failure = ConnectError.from(error);
  const info = failure.findDetails(ErrorInfoSchema)[0];
  const retry = failure.findDetails(RetryInfoSchema)[0];
  return {
    reason: info?.reason ?? failure.code.toString(),
    message: failure.rawMessage,
    retryAfterSeconds: retry?.retryDelay ? Number(retry.retryDelay.seconds) : null,
  };
}

export function reasonOf(error: unknown): string {
  return refusal(error).reason;
}

/** The refusal as a page shows it: the reason, then the server's message. */
export function refusalView(error: unknown): HTMLElement {
  const { reason, message, retryAfterSeconds } = refusal(error);
  return h(
    "div",
    { class: "refusal", role: "alert" },
    h("strong", { class: "reason" }, reason),
    " ",
    h("span", { class: "message" }, message),
    retryAfterSeconds !== null ? ` (try again in ${retryAfterSeconds} s)` : null,
  );
}
