-- Session tokens ended before their expiry (logout). A token's `jti` is kept
-- until the token would have expired anyway; housekeeping removes it then.
CREATE TABLE revoked_tokens (
    jti        text        PRIMARY KEY,
    user_id    bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);
