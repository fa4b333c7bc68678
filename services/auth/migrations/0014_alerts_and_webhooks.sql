-- Spending alerts and their webhooks (services/auth/README.md, "Spending alerts
-- and webhooks").

-- A user's webhook endpoint: one per user. `secret` is the HMAC key itself, not a
-- hash: signing needs the key (SECURITY.md). `thresholds`: the percentages of
-- each budget that raise an alert; a user without a row gets 50, 80, 100.
CREATE TABLE webhooks (
    user_id    bigint      PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    url        text        NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    secret     text        NOT NULL CHECK (secret LIKE 'whsec\_%'),
    thresholds smallint[]  NOT NULL CHECK (cardinality(thresholds) BETWEEN 1 AND 5
                                           AND 1 <= ALL (thresholds) AND 100 >= ALL (thresholds)),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per threshold reached, per budget (scope, subject, counter) and
-- period: the UNIQUE constraint is what makes an alert fire exactly once,
-- whatever the number of auth instances or retried batches (INSERT ... ON
-- CONFLICT DO NOTHING RETURNING: only the instance whose insert won tells
-- anyone). `user_id`: the owner, who is told and may read it.
CREATE TABLE alert_events (
    id           bigint         GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     text           NOT NULL UNIQUE CHECK (event_id LIKE 'evt\_%'),
    user_id      bigint         NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    scope        text           NOT NULL CHECK (scope IN ('user', 'key', 'org')),
    subject_id   bigint         NOT NULL,
    counter      text           NOT NULL CHECK (counter IN ('spend_per_day', 'spend_per_month')),
    period_start date           NOT NULL,  -- the UTC day, or the first day of the UTC month
    threshold    smallint       NOT NULL CHECK (threshold BETWEEN 1 AND 100),
    spent        numeric(24,10) NOT NULL,
    budget       numeric(18,6)  NOT NULL,
    currency     text           NOT NULL,
    created_at   timestamptz    NOT NULL DEFAULT now(),
    UNIQUE (scope, subject_id, counter, period_start, threshold)
);
CREATE INDEX alert_events_user ON alert_events (user_id, id DESC);

-- One delivery per alert whose owner had a webhook when it fired. A sender
-- claims due ones (FOR UPDATE SKIP LOCKED) and moves `next_attempt_at` past its
-- request's timeout in the same statement: two instances never send one at
-- once, and one that dies mid-send is retried once that lease has passed.
CREATE TABLE webhook_deliveries (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id        bigint      NOT NULL REFERENCES alert_events (id) ON DELETE CASCADE,
    user_id         bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,  -- NULL once delivered or failed
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (alert_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

-- The delivery log: one row per attempt.
CREATE TABLE webhook_attempts (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    user_id         bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    status_code     integer,  -- NULL: no answer (see `error`)
    error           text,     -- NULL: an answer came (see `status_code`)
    duration_ms     integer     NOT NULL,
    next_attempt_at timestamptz,  -- NULL: no retry (delivered, or the last attempt)
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_user ON webhook_attempts (user_id, id DESC);
