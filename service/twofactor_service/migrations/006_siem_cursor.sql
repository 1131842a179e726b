-- Audit export to a SIEM over syslog (siem_export.py): how far the receiver has taken the log.
--
-- One row: the last audit event, in the commit-safe (txid, sequence) order that followers and
-- the sealer use, that the receiver is known to have taken. The exporter (one replica at a
-- time, under an advisory lock held on its own connection) resumes after it: after a restart,
-- a receiver outage or a failover, so no event is lost; an event sent after the last update
-- may be sent twice (at least once).
CREATE TABLE siem_cursor (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_txid     xid8 NOT NULL,
    last_sequence bigint NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The start: nothing exported yet, so the first export sends the whole log, oldest first.
INSERT INTO siem_cursor (last_txid, last_sequence) VALUES ('0', 0);
