// Audit log: newest first, with filters, and new events as they are written
// (WatchAuditEvents, a server stream over gRPC-Web).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { AuditOutcome } from "./gen/twofactor/v1/enums_pb.js";
import type { AuditEvent } from "./gen/twofactor/v1/twofactor_service_pb.js";
import { h, field, form, show } from "./dom.js";
import { refusalView } from "./errors.js";
import { authorization, client } from "./session.js";

const PAGE_SIZE = 50;

function eventRow(event: AuditEvent): HTMLTableRowElement {
  return h(
    "tr",
    { "data-sequence": event.sequence.toString() },
    h("td", {}, event.time ? timestampDate(event.time).toLocaleString() : ""),
    h("td", {}, event.actor),
    h("td", {}, event.operation),
    h("td", {}, event.target),
    h("td", { class: "outcome" }, event.outcome === AuditOutcome.SUCCESS ? "success" : "failure"),
    h("td", {}, event.reason),
    h("td", {}, event.peer),
  );
}

/** Shows the audit log until `leaving` aborts (the person went to another screen). */
export async function auditScreen(root: HTMLElement, leaving: AbortSignal): Promise<void> {
  const actor = field("Actor", { autocomplete: "off" });
  const target = field("Target", { autocomplete: "off" });
  const operation = field("Operation", { autocomplete: "off", placeholder: "e.g. ResetSecret" });
  const rows = h("tbody");
  const problems = h("div", { class: "problems" });
  const live = h("p", { class: "live", role: "status" });
  const older = h("button", { type: "button", hidden: true }, "Older events");
  let nextToken = "";
  let watching: AbortController | null = null;

  const filters = () => ({
    actorUsername: actor.input.value.trim(),
    targetUsername: target.input.value.trim(),
    operation: operation.input.value.trim(),
  });
  const matches = (event: AuditEvent) => {
    const wanted = filters();
    const same = (a: string, b: string) => !b || a.toLowerCase() === b.toLowerCase();
    return (
      same(event.actor, wanted.actorUsername) &&
      same(event.target, wanted.targetUsername) &&
      (!wanted.operation || event.operation === wanted.operation)
    );
  };

  const page = async (token: string) => {
    const answer = await client.listAuditEvents(
      { ...filters(), pageSize: PAGE_SIZE, pageToken: token },
      { headers: authorization() },
    );
    rows.append(...answer.events.map(eventRow));
    nextToken = answer.nextPageToken;
    older.hidden = !nextToken;
    return answer.events;
  };

  const follow = async (after: bigint) => {
    watching?.abort();
    const stop = new AbortController();
    watching = stop;
    leaving.addEventListener("abort", () => stop.abort(), { once: true });
    live.textContent = "Following new events.";
    try {
      for await (const message of client.watchAuditEvents(
        { afterSequence: after },
        { headers: authorization(), signal: stop.signal },
      )) {
        if (message.event && matches(message.event)) rows.prepend(eventRow(message.event));
      }
    } catch (error) {
      if (stop.signal.aborted) return;
      live.textContent = "";
      problems.replaceChildren(refusalView(error));
    }
  };

  const reload = async () => {
    problems.replaceChildren();
    rows.replaceChildren();
    try {
      const events = await page("");
      // Follow from the newest event shown (0: from now on).
      void follow(events.length ? events[0]!.sequence : 0n);
    } catch (error) {
      problems.replaceChildren(refusalView(error));
    }
  };
  older.addEventListener("click", () => {
    page(nextToken).catch((error: unknown) => problems.replaceChildren(refusalView(error)));
  });

  show(
    root,
    h("h1", {}, "Audit log"),
    form(reload, actor.row, target.row, operation.row, h("button", { type: "submit" }, "Filter")),
    problems,
    live,
    h(
      "table",
      { class: "audit" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ...["Time", "Actor", "Operation", "Target", "Outcome", "Reason", "Peer"].map((name) =>
            h("th", {}, name),
          ),
        ),
      ),
      rows,
    ),
    older,
  );
  await reload();
}
