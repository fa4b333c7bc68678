-- One row per request (never the prompt: only its hash), and the per-day
-- aggregates the dashboard reads, kept in the same statement as the inserts.

CREATE TABLE usage (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id        text        NOT NULL UNIQUE,
    user_id           bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id            bigint      REFERENCES api_keys (id) ON DELETE SET NULL,
    model             text        NOT NULL,
    prompt_hash       text,
    prompt_tokens     integer     NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens integer     NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cached            boolean     NOT NULL DEFAULT false,
    latency_ms        integer     CHECK (latency_ms >= 0),
    status            text        NOT NULL,
    worker            text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_user_created ON usage (user_id, created_at);

CREATE TABLE usage_daily (
    user_id           bigint  NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id            bigint,  -- NULL: requests made without an API key
    day               date    NOT NULL,  -- UTC
    requests          bigint  NOT NULL DEFAULT 0,
    prompt_tokens     bigint  NOT NULL DEFAULT 0,
    completion_tokens bigint  NOT NULL DEFAULT 0,
    errors            bigint  NOT NULL DEFAULT 0,
    cache_hits        bigint  NOT NULL DEFAULT 0
);
-- COALESCE so that the "no key" rows aggregate too (NULLs never conflict).
CREATE UNIQUE INDEX usage_daily_key ON usage_daily (user_id, day, (COALESCE(key_id, 0)));
