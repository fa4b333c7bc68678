-- Two routing settings (services/auth/README.md, "Routing settings"), and the
-- dead letters: requests that failed after every fallback (README.md, "Dead letters").
--
-- `aliases`: an alias name -> its chain of models (the first serves, the rest are
-- tried in order); `first_token_timeout`: seconds a model has to send its first token
-- before the gateway falls back (JSON null: no such limit). Seeded with their
-- defaults at version 0: the table's version does not move, and a gateway holding
-- it already has what these rows mean (no alias, no limit).
ALTER TABLE settings DROP CONSTRAINT settings_name_check;
ALTER TABLE settings ADD CONSTRAINT settings_name_check CHECK (name IN (
    'default_model', 'fallback_models', 'cache_ttl', 'aliases', 'first_token_timeout'));

INSERT INTO settings (name, value) VALUES ('aliases', '{}'), ('first_token_timeout', 'null');

-- One row per failed request whose gateway tried more than one model (a usage
-- record with `status` other than ok and a non-empty `tried`), written in the
-- statement's transaction that stores its usage row, once per request id.
-- Never the prompt: its hash, as in `usage`. Bounded: the housekeeper keeps the
-- INFERSWARM_DEAD_LETTERS_MAX newest (by id) and deletes the rest.
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  text        NOT NULL UNIQUE,
    user_id     bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id      bigint      REFERENCES api_keys (id) ON DELETE SET NULL,
    asked       text,                 -- the model the caller named (an alias, `default`); NULL: `model`
    model       text        NOT NULL, -- the model tried last
    prompt_hash text,
    status      text        NOT NULL, -- the reason: the record's status (error, timeout, ...)
    tried       jsonb       NOT NULL, -- [{model, code}]: each attempt that failed, in order
    at          timestamptz NOT NULL, -- when the request happened (the record's `at`)
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- `auth.dead_letters(model=...)` matches either name; newest first by id.
CREATE INDEX dead_letters_model ON dead_letters (model, id);
CREATE INDEX dead_letters_asked ON dead_letters (asked, id) WHERE asked IS NOT NULL;
