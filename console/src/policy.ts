// Which RPCs the signed-in actor may call, read from the access policy that each RPC declares
// in the proto (twofactor.v1.access_policy, kept in the generated descriptors) and the
// actor's own status: its rights and whether it signed in with two-factor authentication.
// Only to decide which buttons to offer; the server decides every call.
import { getOption } from "@bufbuild/protobuf";
import { TwoFactorState } from "./gen/twofactor/v1/enums_pb.js";
import { access_policy } from "./gen/twofactor/v1/options_pb.js";
import {
  TwoFactorService,
  type AccountStatus,
} from "./gen/twofactor/v1/twofactor_service_pb.js";

export type Rpc = (typeof TwoFactorService.methods)[number]["name"];

/** May `actor` call `rpc`, on its own account (`own`) or another's? */
export function mayCall(actor: AccountStatus, rpc: string, own = false): boolean {
  const method = TwoFactorService.methods.find((m) => m.name === rpc);
  if (method === undefined) return false;
  const policy = getOption(method, access_policy);
  if (policy.allowAnonymous) return true;
  const right = policy.requiredRight;
  if (right !== undefined && !(own && policy.allowSelfWithoutRight)) {
    const held = actor.rights.some(
      (r) => r.functionalArea === right.functionalArea && r.permission === right.permission,
    );
    if (!held) return false;
  }
  // The console opens a session of an enrolled account only with its code.
  if (policy.requireTwoFactor && actor.state !== TwoFactorState.ENROLLED) return false;
  return true;
}

export interface RightName {
  functionalArea: string;
  permission: string;
}

/** Every right some RPC's access policy requires: the rights worth granting. */
export function knownRights(): RightName[] {
  const found = new Map<string, RightName>();
  for (const method of TwoFactorService.methods) {
    const right = getOption(method, access_policy).requiredRight;
    if (right === undefined) continue;
    found.set(`${right.functionalArea}\u0000${right.permission}`, {
      functionalArea: right.functionalArea,
      permission: right.permission,
    });
  }
  return [...found.values()];
}

// The seed page's words for the permissions ("the Modify object ACLs right").
const PERMISSION_NAMES: Record<string, string> = {
  MODIFY_OBJECT_ACLS: "Modify object ACLs",
  VERIFY_CODES: "Verify codes",
  VOUCH_DOMAIN_SIGN_IN: "Vouch for domain sign-ins",
};

/** A permission as a person reads it; an unknown one as it is stored. */
export function permissionName(permission: string): string {
  return PERMISSION_NAMES[permission] ?? permission;
}

/** "Modify object ACLs (General features: User permissions)". */
export function rightName(right: RightName): string {
  return `${permissionName(right.permission)} (${right.functionalArea})`;
}
