-- The attempt budget: pay before looking (SPEC §4; store/attempts.py explains the design).
--
-- Every evaluation of a secret is paid for first, by one conditional UPDATE that checks the
-- lockout and opens the attempt, counted as if it had failed; its outcome is settled with its
-- audit event in one statement. Failed and still-open attempts together make the count the
-- lockout schedule reads.

ALTER TABLE accounts
    -- Attempts paid for and not settled yet: presumed failed until they succeed.
    ADD COLUMN attempts_open integer NOT NULL DEFAULT 0,
    -- When the last attempt was paid for (counts idle for a day are forgotten).
    ADD COLUMN last_attempt_at timestamptz;

-- The lockout after `failures` consecutive failures: schedule[failures], the last entry beyond
-- the end (rules.lockout_schedule), or NULL when that many failures cost nothing.
CREATE FUNCTION lockout_delay(failures bigint, schedule integer[]) RETURNS interval
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN schedule[least(failures, cardinality(schedule))] > 0
                THEN make_interval(secs => schedule[least(failures, cardinality(schedule))]) END
$$;

-- Names that are not accounts (or not INTERNAL ones, at SignIn) are throttled like accounts,
-- so the lockout does not tell which names exist. Counters are kept per bucket of a keyed hash
-- of the name: the table never holds more rows than there are buckets, however many names a
-- flood tries. Unknown names never succeed.
CREATE TABLE unknown_name_attempts (
    bucket          integer PRIMARY KEY,
    failed_attempts integer NOT NULL DEFAULT 0,
    attempts_open   integer NOT NULL DEFAULT 0,
    last_attempt_at timestamptz NOT NULL,
    locked_until    timestamptz
);

-- The key of that hash, made here once per database (gen_random_uuid draws from PostgreSQL's
-- strong random source): without it an attacker cannot tell which names share a bucket.
CREATE TABLE unknown_name_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key       bytea NOT NULL
);
INSERT INTO unknown_name_key (key)
VALUES (sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')));

-- The bucket of a (casefolded) name: 24 bits of the keyed hash, modulo the bucket count.
CREATE FUNCTION unknown_name_bucket(name_key text, buckets integer) RETURNS integer
LANGUAGE sql STABLE STRICT AS $$
    SELECT ((get_byte(h, 0) << 16) | (get_byte(h, 1) << 8) | get_byte(h, 2)) % buckets
    FROM (SELECT sha256(k.key || convert_to(name_key, 'UTF8')) AS h FROM unknown_name_key k) s
$$;
