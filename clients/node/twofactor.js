// A TwoFactorService client on the stock @grpc/grpc-js: the contract is read from
// protos/twofactor/v1/*.proto at run time by @grpc/proto-loader, so there is no generated code
// to keep in step with the protos.

import { fileURLToPath } from "node:url";
import path from "node:path";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

/** protos/ of this repository; TWOFACTOR_PROTO_DIR points elsewhere (a copy of protos/). */
export const PROTO_DIR =
  process.env.TWOFACTOR_PROTO_DIR ??
  path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the proto (snake_case), as every other language sees them
  enums: String, // "SIGN_IN_OUTCOME_SESSION_OPENED" rather than 1
  longs: String, // int64 (audit sequence numbers) without precision loss
  defaults: true,
  oneofs: true,
};

/** The TwoFactorService client constructor, from the .proto files. */
export function loadService(protoDir = PROTO_DIR) {
  const definition = protoLoader.loadSync("twofactor/v1/twofactor_service.proto", {
    ...LOADER_OPTIONS,
    includeDirs: [protoDir],
  });
  return grpc.loadPackageDefinition(definition).twofactor.v1.TwoFactorService;
}

/**
 * A connected client whose unary RPCs return promises:
 * `await client.SignIn({ username, password })`, or with a session
 * `await client.GetAccountStatus({}, { token })`.
 *
 * `credentials` defaults to plaintext; for TLS pass
 * `grpc.credentials.createSsl(fs.readFileSync("ca.pem"))` (and a client key and certificate for
 * mTLS).
 */
export function connect(
  address,
  { credentials = grpc.credentials.createInsecure(), deadlineSeconds = 10 } = {},
) {
  const Service = loadService();
  const stub = new Service(address, credentials);
  const client = { close: () => stub.close() };
  for (const [name, method] of Object.entries(Service.service)) {
    if (method.requestStream || method.responseStream) continue; // WatchAuditEvents: use the stub
    client[name] = (request, { token, stepUp } = {}) =>
      new Promise((resolve, reject) => {
        const deadline = new Date(Date.now() + deadlineSeconds * 1000);
        stub[name](request, callMetadata(token, stepUp), { deadline }, (error, response) =>
          error ? reject(error) : resolve(response),
        );
      });
  }
  client.stub = stub;
  return client;
}

/**
 * Call metadata: the session token as `authorization: Bearer <token>`, and for a change to a
 * protected account the actor's own step-up proof (`{ password, code }`).
 */
export function callMetadata(token, stepUp) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  if (stepUp?.password) metadata.set("x-step-up-password", stepUp.password);
  if (stepUp?.code) metadata.set("x-step-up-code", stepUp.code);
  return metadata;
}

// google.rpc.Status and the two error details the service sends (AIP-193), declared here so the
// client needs no copy of googleapis' protos.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: "google.protobuf.Duration", id: 1 } } },
          },
        },
      },
    },
  },
});
const Status = rpcTypes.lookupType("google.rpc.Status");
const ErrorInfo = rpcTypes.lookupType("google.rpc.ErrorInfo");
const RetryInfo = rpcTypes.lookupType("google.rpc.RetryInfo");

/**
 * What a failed call says, as plain values: the status code's name, the message, and from the
 * `grpc-status-details-bin` trailer the ErrorInfo `reason` (e.g. "STEP_UP_REQUIRED", so a UI
 * knows to show the account-protection window) and the RetryInfo delay when waiting helps.
 */
export function describeError(error) {
  const described = {
    code: grpc.status[error.code] ?? String(error.code),
    message: error.details ?? error.message,
    reason: "",
    retry_delay_seconds: null,
  };
  const [raw] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return described;
  const status = Status.decode(raw);
  for (const detail of status.details) {
    if (detail.type_url.endsWith("/google.rpc.ErrorInfo")) {
      described.reason = ErrorInfo.decode(detail.value).reason;
    } else if (detail.type_url.endsWith("/google.rpc.RetryInfo")) {
      described.retry_delay_seconds = Number(RetryInfo.decode(detail.value).retry_delay?.seconds ?? 0);
    }
  }
  return described;
}
