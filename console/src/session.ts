// The session token lives in sessionStorage only (this tab, until it closes): never in
// localStorage, never in a cookie.
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { TwoFactorService } from "./gen/twofactor/v1/twofactor_service_pb.js";

const KEY = "twofactor.session";

export interface Session {
  token: string;
  username: string;
}

export const client: Client<typeof TwoFactorService> = createClient(
  TwoFactorService,
  createGrpcWebTransport({ baseUrl: window.location.origin, useBinaryFormat: true }),
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
