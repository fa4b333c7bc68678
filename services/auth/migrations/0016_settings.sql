-- The platform's routing settings, edited by administrators or the operator
-- (`auth.set_settings`) and read by every gateway (`auth.settings_table`),
-- instead of being fixed in code or in each gateway's environment
-- (services/auth/README.md, "Routing settings"). One row per setting, seeded
-- with its default; a cleared setting keeps its row (value JSON null or []),
-- so a row is never deleted and `version` only grows.
CREATE SEQUENCE settings_version;

CREATE TABLE settings (
    name       text        PRIMARY KEY CHECK (name IN ('default_model', 'fallback_models', 'cache_ttl')),
    value      jsonb       NOT NULL,  -- JSON null: unset (the default)
    -- From `settings_version` on each change; max(version) is the table's version.
    -- Changes lock every row first, so versions are taken in commit order and a
    -- reader holding max(version) has seen every change up to it.
    version    bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz,  -- NULL: as seeded, never set
    updated_by bigint      REFERENCES users (id) ON DELETE SET NULL  -- NULL: the operator (or seeded)
);

INSERT INTO settings (name, value) VALUES
    ('default_model', 'null'), ('fallback_models', '[]'), ('cache_ttl', 'null');
