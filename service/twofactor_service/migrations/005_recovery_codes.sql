-- Recovery codes (O11): one-time codes an ENROLLED account makes for itself, each usable once
-- in place of a TOTP code at sign-in (recovery_codes.py explains the format and the hashing).
--
-- Only a salted SHA-256 of each code is kept, never the code: with 80 bits of entropy per code
-- a fast hash is enough (docs/choices.md). Generating a set replaces the account's old one;
-- a reset, a deletion of the key or an exclusion deletes them, in the same transaction.

CREATE TABLE recovery_codes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    -- 16 random bytes, then SHA-256(salt || the code's 16 normalised characters).
    salt       bytea NOT NULL CHECK (octet_length(salt) = 16),
    code_hash  bytea NOT NULL CHECK (octet_length(code_hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set once, by the sign-in that used the code: UPDATE ... WHERE used_at IS NULL, so of two
    -- sign-ins racing with one code (on any replicas) exactly one gets it.
    used_at    timestamptz
);
-- A sign-in reads an account's unused codes with the account, in the same round trip; a new
-- set or a reset deletes them all.
CREATE INDEX recovery_codes_account_id ON recovery_codes (account_id);
