-- Every change that can alter who a caller is (transport/identities.py caches it per process)
-- notifies the channel twofactor_identity with the account's id, delivered at commit to every
-- replica that listens: a session ended or changed, a right granted or revoked, an active key
-- made, activated or deleted, an account's name, kind or protection changed.

CREATE FUNCTION notify_identity_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed record := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
BEGIN
    -- TG_ARGV[0]: the column holding the account's id.
    PERFORM pg_notify('twofactor_identity', to_jsonb(changed) ->> TG_ARGV[0]);
    RETURN NULL;
END
$$;

-- A session ended, or its lifetime changed (the once-a-minute idle bookkeeping too: a cached
-- session is then read again, which costs a query a minute).
CREATE TRIGGER sessions_identity AFTER UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION notify_identity_changed('account_id');

CREATE TRIGGER account_rights_identity AFTER INSERT OR UPDATE OR DELETE ON account_rights
    FOR EACH ROW EXECUTE FUNCTION notify_identity_changed('account_id');

-- Whether an account has an active key; the hot path's own writes (last_used_step, the
-- key rotation's re-encryption) touch other columns and notify nobody.
CREATE TRIGGER secret_keys_identity AFTER INSERT OR DELETE OR UPDATE OF state ON secret_keys
    FOR EACH ROW EXECUTE FUNCTION notify_identity_changed('account_id');

CREATE TRIGGER accounts_identity AFTER UPDATE OF username, kind, protected ON accounts
    FOR EACH ROW EXECUTE FUNCTION notify_identity_changed('id');
