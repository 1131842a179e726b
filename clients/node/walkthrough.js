// The Node.js walk-through: an allowlisted account signs in and sets up its key, signs in again
// with a code, and a service account verifies one of its codes. Prints one JSON object per step.
//
//   TWOFACTOR_USERNAME=alice TWOFACTOR_PASSWORD=... \
//   TWOFACTOR_SERVICE_USERNAME=verifier TWOFACTOR_SERVICE_PASSWORD=... node walkthrough.js
//
// TWOFACTOR_ADDRESS defaults to 127.0.0.1:50051 (`make run`). otpauth plays the authenticator
// app. Each code must come from a time step not used before (the service accepts a step once), so
// between codes the script waits for the next 30-second step, as the app's user would.
//
// Under the test suite the server reads a test clock that runs TWOFACTOR_CLOCK_OFFSET_SECONDS
// ahead of real time. Then, instead of waiting, the script asks the test to move that clock one
// step forward, as the Python tests' Person.next_code() does: it prints
// {"event": "advance_clock", "seconds": 30} and reads one line from stdin once the test has.

import readline from "node:readline";
import { setTimeout as sleep } from "node:timers/promises";

import * as OTPAuth from "otpauth";

import { connect, describeError } from "./twofactor.js";

const env = process.env;
const testClockOffset = env.TWOFACTOR_CLOCK_OFFSET_SECONDS;

function required(name) {
  const value = env[name];
  if (!value) throw new Error(`set ${name}`);
  return value;
}

function print(object) {
  process.stdout.write(`${JSON.stringify(object)}\n`);
}

/** The service's idea of now, in seconds: real time, plus the test clock's offset if any. */
class Clock {
  constructor(offsetSeconds) {
    this.offsetSeconds = offsetSeconds;
    this.input = null; // stdin, read only under a test clock
    this.lines = null;
  }

  now() {
    return Date.now() / 1000 + this.offsetSeconds;
  }

  /** Moves on to a time step that no earlier code of this run used. */
  async nextStep(periodSeconds, usedSteps) {
    if (testClockOffset !== undefined) {
      if (this.input === null) {
        this.input = readline.createInterface({ input: process.stdin });
        this.lines = this.input[Symbol.asyncIterator]();
      }
      print({ event: "advance_clock", seconds: periodSeconds });
      const { done } = await this.lines.next();
      if (done) throw new Error("stdin closed while waiting for the test clock");
      this.offsetSeconds += periodSeconds;
    } else {
      while (usedSteps.has(Math.floor(this.now() / periodSeconds))) await sleep(1000);
    }
    usedSteps.add(Math.floor(this.now() / periodSeconds));
  }
}

/** The authenticator app: reads the otpauth:// URI and shows the current code. */
class Authenticator {
  constructor(provisioningUri, clock) {
    this.totp = OTPAuth.URI.parse(provisioningUri);
    this.clock = clock;
    this.usedSteps = new Set();
  }

  async freshCode() {
    await this.clock.nextStep(this.totp.period, this.usedSteps);
    return this.totp.generate({ timestamp: this.clock.now() * 1000 });
  }
}

async function main() {
  const username = required("TWOFACTOR_USERNAME");
  const password = required("TWOFACTOR_PASSWORD");
  const service = {
    username: required("TWOFACTOR_SERVICE_USERNAME"),
    password: required("TWOFACTOR_SERVICE_PASSWORD"),
  };
  const clock = new Clock(testClockOffset === undefined ? 0 : Number(testClockOffset));
  const client = connect(env.TWOFACTOR_ADDRESS ?? "127.0.0.1:50051");
  try {
    // 1. First sign-in of an allowlisted account: the password alone returns an enrollment
    //    ticket and the pending key (secret, otpauth:// URI, QR code), shown this once.
    const first = await client.SignIn({ username, password });
    const key = first.enrollment?.pending_key;
    print({
      step: "sign_in",
      outcome: first.outcome,
      pending_key: key && {
        algorithm: key.algorithm,
        digits: key.digits,
        period_seconds: key.period_seconds,
        provisioning_uri_scheme: new URL(key.provisioning_uri).protocol,
        qr_code_png_bytes: key.qr_code_png.length,
      },
    });
    if (first.outcome !== "SIGN_IN_OUTCOME_ENROLLMENT_REQUIRED") {
      throw new Error("this walk-through starts with an allowlisted account that has no key yet");
    }
    const app = new Authenticator(key.provisioning_uri, clock);

    // 2. Confirm the key with a code from the app: the key becomes active, a session opens.
    const enrolled = await client.CompleteEnrollment({
      enrollment_ticket: first.enrollment.enrollment_ticket,
      code: await app.freshCode(),
    });
    print({ step: "complete_enrollment", session_opened: Boolean(enrolled.session?.token) });

    // 3. Every later sign-in needs the code; without one the service says so in its ErrorInfo.
    try {
      await client.SignIn({ username, password });
      print({ step: "sign_in_without_code", error: null });
    } catch (error) {
      print({ step: "sign_in_without_code", error: describeError(error) });
    }
    const second = await client.SignIn({ username, password, code: await app.freshCode() });
    print({
      step: "sign_in_with_code",
      outcome: second.outcome,
      session_opened: Boolean(second.session?.token),
    });
    const { status } = await client.GetAccountStatus({}, { token: second.session.token });
    print({ step: "account_status", state: status.state, allowlisted: status.allowlisted });

    // 4. A backend with its own sign-in checks a code through a service account's session
    //    (excluded from 2FA, holding VERIFY_CODES). A code is accepted once.
    const serviceSignIn = await client.SignIn(service);
    const serviceToken = serviceSignIn.session.token;
    const code = await app.freshCode();
    const verified = await client.VerifyCode({ username, code }, { token: serviceToken });
    print({ step: "verify_code", result: verified.result });
    const replayed = await client.VerifyCode({ username, code }, { token: serviceToken });
    print({ step: "verify_code_replayed", result: replayed.result });

    print({ step: "done", clock_offset_seconds: clock.offsetSeconds });
  } finally {
    client.close();
    clock.input?.close();
  }
}

main().catch((error) => {
  print({ step: "failed", error: error.code === undefined ? String(error) : describeError(error) });
  process.exitCode = 1;
});
