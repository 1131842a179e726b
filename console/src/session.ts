// The session token lives in sessionStorage only (this tab, until it closes): never in
// localStorage, never in a cookie. A call that the server refuses because the session is over
// (reason UNAUTHENTICATED: unknown, expired or ended) hands the page back to Sign in.
import {
  Code,
  ConnectError,
  createClient,
  type Client,
  type Interceptor,
} from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { TwoFactorService } from "./gen/twofactor/v1/twofactor_service_pb.js";

const KEY = "twofactor.session";

export interface Session {
  token: string;
  username: string;
  /** When the session ends at the latest (milliseconds since the epoch); 0 when unknown. */
  expiresAt: number;
}

let sessionEnded: (why: string) => void = () => undefined;

/** `handler` runs once when a call finds the session over, with a sentence saying why. */
export function onSessionEnded(handler: (why: string) => void): void {
  sessionEnded = handler;
}

/** Why a session the server no longer knows has ended, as far as the page can tell. */
function whyEnded(session: Session): string {
  if (session.expiresAt && Date.now() >= session.expiresAt) {
    const at = new Date(session.expiresAt).toLocaleTimeString();
    return `Your session expired at ${at}. Sign in again.`;
  }
  return (
    "Your session has ended: it was idle too long, was signed out elsewhere, or was ended " +
    "when your secret key was reset. Sign in again."
  );
}

const watchSession: Interceptor = (next) => async (request) => {
  try {
    return await next(request);
  } catch (error) {
    const failure = ConnectError.from(error);
    const session = currentSession();
    if (
      session !== null &&
      request.header.has("authorization") &&
      failure.code === Code.Unauthenticated &&
      failure.findDetails(ErrorInfoSchema)[0]?.reason === "UNAUTHENTICATED"
    ) {
      forgetSession();
      sessionEnded(whyEnded(session));
    }
    throw error;
  }
};

export const client: Client<typeof TwoFactorService> = createClient(
  TwoFactorService,
  createGrpcWebTransport({
    baseUrl: window.location.origin,
    useBinaryFormat: true,
    interceptors: [watchSession],
  }),
);

export function currentSession(): Session | null {
  const stored = sessionStorage.getItem(KEY);
  return stored ? (JSON.parse(stored) as Session) : null;
}

export function keepSession(session: Session): void {
  sessionStorage.setItem(KEY, JSON.stringify(session));
}

export function forgetSession(): void {
  sessionStorage.removeItem(KEY);
}

/** The call metadata of the session (empty when signed out). */
export function authorization(): Record<string, string> {
  const session = currentSession();
  return session ? { authorization: `Bearer ${session.token}` } : {};
}
