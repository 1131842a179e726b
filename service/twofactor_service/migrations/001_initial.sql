-- Accounts, their rights, secret keys, sessions, enrollment tickets, settings and the audit log.
-- All state lives here, so any number of replicas can serve behind one load balancer.

CREATE TABLE accounts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username        text NOT NULL,
    -- Case-insensitive uniqueness: the store writes username.casefold() here.
    username_key    text NOT NULL UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('INTERNAL', 'DOMAIN')),
    -- argon2id; only INTERNAL accounts have a password here.
    password_hash   text,
    protected       boolean NOT NULL DEFAULT false,
    allowlisted     boolean NOT NULL DEFAULT false,
    excluded        boolean NOT NULL DEFAULT false,
    -- Consecutive failed codes/passwords and the lockout they caused (RFC 4226 §7.3).
    failed_attempts integer NOT NULL DEFAULT 0,
    locked_until    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT (allowlisted AND excluded)),
    CHECK ((kind = 'INTERNAL') = (password_hash IS NOT NULL))
);

CREATE TABLE account_rights (
    account_id      bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    functional_area text NOT NULL,
    permission      text NOT NULL,
    PRIMARY KEY (account_id, functional_area, permission)
);

-- At most one ACTIVE and one PENDING key per account.
CREATE TABLE secret_keys (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id        bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    state             text NOT NULL CHECK (state IN ('ACTIVE', 'PENDING')),
    -- AES-256-GCM: which key of the ring, the nonce, and ciphertext+tag.
    encryption_key_id text NOT NULL,
    nonce             bytea NOT NULL,
    ciphertext        bytea NOT NULL,
    algorithm         text NOT NULL,
    digits            integer NOT NULL,
    period_seconds    integer NOT NULL,
    -- The newest time step accepted: a code of this step or older is a replay (SPEC §4).
    last_used_step    bigint NOT NULL DEFAULT -1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    UNIQUE (account_id, state),
    CHECK ((state = 'PENDING') = (expires_at IS NOT NULL))
);

CREATE TABLE sessions (
    -- SHA-256 of the bearer token; the token itself is never stored.
    token_hash                bytea PRIMARY KEY,
    account_id                bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    signed_in_with_two_factor boolean NOT NULL,
    created_at                timestamptz NOT NULL DEFAULT now(),
    last_seen_at              timestamptz NOT NULL DEFAULT now(),
    expires_at                timestamptz NOT NULL
);
CREATE INDEX sessions_account_id ON sessions (account_id);

CREATE TABLE enrollment_tickets (
    ticket_hash   bytea PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    -- The pending key this ticket confirms; a reset deletes the key and with it the ticket.
    secret_key_id bigint NOT NULL REFERENCES secret_keys (id) ON DELETE CASCADE,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX enrollment_tickets_account_id ON enrollment_tickets (account_id);

CREATE TABLE settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    issuer_name text NOT NULL
);

CREATE TABLE audit_events (
    sequence    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text NOT NULL,
    target      text NOT NULL,
    operation   text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('SUCCESS', 'FAILURE')),
    reason      text NOT NULL,
    request_id  text NOT NULL,
    peer        text NOT NULL,
    -- The writing transaction: followers read events in commit-safe (txid, sequence) order.
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX audit_events_txid ON audit_events (txid, sequence);
CREATE INDEX audit_events_target ON audit_events (lower(target), sequence);
CREATE INDEX audit_events_actor ON audit_events (lower(actor), sequence);
