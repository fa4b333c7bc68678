-- The tiers and their limits, edited by administrators (`auth.set_tier_limits`)
-- instead of being fixed in code (shared/tiers.py keeps the defaults seeded
-- here). NULL is "no limit" (no budget, for money). `updated_at` NULL: as
-- seeded, never edited; such a row's tokens_per_month is taken from the
-- environment (INFERSWARM_TIER_<TIER>_TOKENS_PER_MONTH) by each auth instance,
-- as before this table existed (services/auth/README.md, "Tiers").
CREATE TABLE tiers (
    name               text          PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,31}$'),
    requests_per_hour  bigint        CHECK (requests_per_hour >= 0),
    requests_per_month bigint        CHECK (requests_per_month >= 0),
    tokens_per_month   bigint        CHECK (tokens_per_month >= 0),
    spend_per_day      numeric(18,6) CHECK (spend_per_day >= 0),
    spend_per_month    numeric(18,6) CHECK (spend_per_month >= 0),
    priority           integer       NOT NULL CHECK (priority BETWEEN 0 AND 9),
    updated_at         timestamptz,
    updated_by         bigint        REFERENCES users (id) ON DELETE SET NULL  -- NULL: the operator (or seeded)
);

INSERT INTO tiers (name, requests_per_hour, requests_per_month, tokens_per_month, priority) VALUES
    ('free',       100,     3000,   100000,   0),
    ('pro',        1000,    30000,  1000000,  1),
    ('enterprise', 10000,   300000, 10000000, 2),
    ('unlimited',  1000000, NULL,   NULL,     3);

-- A change of a tier's limits concerns every key and session of its users:
-- logged as an entry naming neither a key nor a user, which every cache reads
-- as "drop everything" (README.md, "Revocation"). Only that reason may.
ALTER TABLE invalidations DROP CONSTRAINT invalidations_check;
ALTER TABLE invalidations ADD CONSTRAINT invalidations_check
    CHECK (key_id IS NOT NULL OR user_id IS NOT NULL OR reason = 'tier_limits_changed');
