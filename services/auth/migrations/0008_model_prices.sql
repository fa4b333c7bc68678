-- Prices per model, versioned: a version applies from `effective_from` on, so
-- a change never reprices what was used before it. Money is NUMERIC, never a
-- float. Prices are per million tokens, at most 6 decimals, below 1 000 000.
CREATE TABLE model_prices (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model          text          NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    input_price    numeric(12,6) NOT NULL CHECK (input_price >= 0),
    output_price   numeric(12,6) NOT NULL CHECK (output_price >= 0),
    -- NULL: a cached answer's prompt costs the input price (0: cache hits are free).
    cached_price   numeric(12,6) CHECK (cached_price >= 0),
    currency       text          NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    effective_from timestamptz   NOT NULL,
    created_at     timestamptz   NOT NULL DEFAULT now(),
    actor_id       bigint        REFERENCES users (id) ON DELETE SET NULL,  -- NULL: the operator
    UNIQUE (model, effective_from)
);

-- What each request cost at the price in force at its time (`created_at`),
-- filled when it is recorded; NULL: its model had no price then (and every
-- row from before prices existed).
ALTER TABLE usage ADD COLUMN cost numeric(20,10), ADD COLUMN currency text;

-- Cost per user, key, UTC day, model and currency, kept in the same statement
-- as the inserts (like usage_daily). `unpriced`: requests with no price, whose
-- currency is ''.
CREATE TABLE usage_daily_costs (
    user_id  bigint         NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id   bigint,  -- NULL: requests made without an API key
    day      date           NOT NULL,  -- UTC
    model    text           NOT NULL,
    currency text           NOT NULL,  -- '' for requests without a price
    requests bigint         NOT NULL DEFAULT 0,
    cost     numeric(24,10) NOT NULL DEFAULT 0,
    unpriced bigint         NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX usage_daily_costs_key
    ON usage_daily_costs (user_id, day, (COALESCE(key_id, 0)), model, currency);

-- The usage stored before this migration: counted, none priced.
INSERT INTO usage_daily_costs (user_id, key_id, day, model, currency, requests, cost, unpriced)
SELECT user_id, key_id, (created_at AT TIME ZONE 'UTC')::date, model, '', count(*), 0, count(*)
FROM usage GROUP BY 1, 2, 3, 4;

-- Round half to even (banker's rounding) at `places` decimals: PostgreSQL's
-- round() and numeric casts round half away from zero. Only exact operations
-- (trunc, round, multiplication): numeric division keeps about 16 digits.
CREATE FUNCTION round_half_even(value numeric, places integer) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN abs(s - trunc(s)) = 0.5 AND mod(trunc(s), 2) = 0 THEN trunc(value, places)
                ELSE round(value, places) END
    FROM (SELECT value * power(10::numeric, places) AS s) AS scaled
$$;
