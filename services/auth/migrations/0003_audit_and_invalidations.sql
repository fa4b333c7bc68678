-- The audit trail of account and key events, the invalidation log that
-- caches follow (see README.md, "Revocation"), and login failure counters.

CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event      text        NOT NULL,  -- user_registered, key_created, key_revoked, tier_changed, ...
    user_id    bigint      REFERENCES users (id) ON DELETE SET NULL,  -- whom it is about
    actor_id   bigint      REFERENCES users (id) ON DELETE SET NULL,  -- who did it
    details    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_user ON audit_log (user_id, created_at);

-- Writers take an advisory lock before inserting, so seq order is commit
-- order and a reader following `seq > cursor` never skips a late commit.
CREATE TABLE invalidations (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id     bigint,
    user_id    bigint,
    reason     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (key_id IS NOT NULL OR user_id IS NOT NULL)
);

-- Failed logins per account ('user:<id>' or 'name:<identifier>') and per caller.
CREATE TABLE login_failures (
    subject      text        PRIMARY KEY,
    failures     integer     NOT NULL,
    last_failure timestamptz NOT NULL,
    locked_until timestamptz NOT NULL
);
