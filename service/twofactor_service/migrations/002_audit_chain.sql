-- Tamper evidence for the audit log: a SHA-256 hash chain over the events.
--
-- Inserting an event stays lock-free (the hot path writes one per VerifyCode). A sealer, one
-- replica at a time, later links the committed events into the chain in the commit-safe
-- (txid, sequence) order that followers of the log already use, and records the chain's end in
-- audit_chain_head. `twofactor verify-audit` recomputes the chain and reports the first event
-- altered or deleted after it was sealed.

ALTER TABLE audit_events
    -- The event's place in the chain (1, 2, 3, ...): a gap is a deleted event. NULL until sealed.
    ADD COLUMN chain_position bigint,
    -- SHA-256(previous event's chain_hash || canonical encoding of this event). NULL until sealed.
    ADD COLUMN chain_hash bytea;

-- The end of the sealed part of the chain: where the sealer carries on, and what the last
-- sealed event must hash to (so deleting the newest events is seen too).
CREATE TABLE audit_chain_head (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_txid      xid8 NOT NULL,
    last_sequence  bigint NOT NULL,
    chain_position bigint NOT NULL,
    chain_hash     bytea NOT NULL,
    sealed_at      timestamptz NOT NULL DEFAULT now()
);

-- The genesis: nothing sealed yet, and the chain starts from 32 zero bytes.
INSERT INTO audit_chain_head (last_txid, last_sequence, chain_position, chain_hash)
VALUES ('0', 0, 0, decode(repeat('00', 32), 'hex'));
