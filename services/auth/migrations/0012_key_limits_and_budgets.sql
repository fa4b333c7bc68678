-- Per-key limits and per-user money budgets (`auth.create_key`/`auth.update_key`
-- `limits`, `auth.set_budget`). NULL: no limit of the key's (or the user's own)
-- for that counter; the tier's still applies. Gateways enforce every counter of
-- every scope of a caller (services/auth/README.md, "Per-key limits and budgets").
-- Money is NUMERIC in the platform currency (INFERSWARM_CURRENCY), never a float;
-- the service checks the bounds it promises (0..10^12 counts, 0..10^9 money, 6
-- decimals: services/auth/limits.py), the database that nothing is negative.
ALTER TABLE api_keys
    ADD COLUMN requests_per_hour bigint CHECK (requests_per_hour >= 0),
    ADD COLUMN requests_per_month bigint CHECK (requests_per_month >= 0),
    ADD COLUMN tokens_per_month bigint CHECK (tokens_per_month >= 0),
    ADD COLUMN spend_per_day numeric(18,6) CHECK (spend_per_day >= 0),
    ADD COLUMN spend_per_month numeric(18,6) CHECK (spend_per_month >= 0);

ALTER TABLE users
    ADD COLUMN spend_per_day numeric(18,6) CHECK (spend_per_day >= 0),
    ADD COLUMN spend_per_month numeric(18,6) CHECK (spend_per_month >= 0);
