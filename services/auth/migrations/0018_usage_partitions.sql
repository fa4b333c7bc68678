-- Usage records partitioned by month (services/auth/README.md, "Usage partitions and
-- retention"). `usage` becomes a table partitioned by RANGE on `created_at`: one partition per
-- UTC month, `usage_YYYY_MM` ([the 1st 00:00 UTC, the next 1st)), and a DEFAULT partition,
-- `usage_default`, so that an insert never fails for want of a month. partitions.py owns them
-- from here on: it makes the months ahead and drops, whole, those past
-- INFERSWARM_USAGE_RETENTION_MONTHS (DROP TABLE: no DELETE, no dead rows to vacuum).
--
-- Idempotency by request id. A unique index of a partitioned table must hold the partition key,
-- and UNIQUE (request_id, created_at) would not be idempotency: a record shipped without `at` is
-- stamped with the time it is stored, so a gateway's retry arriving after midnight of the 1st
-- would land in the next month's partition beside the first copy, and be counted twice. So the
-- request ids have a table of their own, not partitioned: `usage_request_ids`, whose primary key
-- is what `usage.request_id UNIQUE` was. The statement that records usage (usage_store.py) claims
-- each id there first (`ON CONFLICT DO NOTHING RETURNING`) and stores only the records it claimed,
-- all in one statement: a retried batch, or two gateways sending the same record, still count
-- once, and a transaction claiming an id another has claimed but not committed waits for it, as
-- it waited on usage's unique index. An id's `created_at` is its record's, so the retention
-- prunes the ids with their month. Not chosen: a unique index per partition (a retry across a
-- month boundary counts twice); a look across the partitions before the insert (racy between two
-- transactions without a lock per id); partitions by hash of request_id (a month could not be
-- dropped whole).
--
-- Every column (in the same order), check, foreign key and index is kept, under its old name
-- (the constraints are named here: the old table still holds those names when this one is made).
-- The primary key becomes (id, created_at), as PostgreSQL requires; ids still come from one
-- identity, so stay unique. `request_id` keeps an index, no longer unique: the uniqueness is
-- usage_request_ids'.
--
-- The rows move in this migration's transaction: `usage` is locked, and usage not recorded (the
-- gateways keep and resend their batches), while they copy.

ALTER TABLE usage RENAME TO usage_unpartitioned;
ALTER SEQUENCE usage_id_seq RENAME TO usage_unpartitioned_id_seq;

CREATE TABLE usage (
    id                bigint      GENERATED ALWAYS AS IDENTITY,
    request_id        text        NOT NULL,
    user_id           bigint      NOT NULL CONSTRAINT usage_user_id_fkey REFERENCES users (id) ON DELETE CASCADE,
    key_id            bigint      CONSTRAINT usage_key_id_fkey REFERENCES api_keys (id) ON DELETE SET NULL,
    model             text        NOT NULL,
    prompt_hash       text,
    prompt_tokens     integer     NOT NULL DEFAULT 0 CONSTRAINT usage_prompt_tokens_check CHECK (prompt_tokens >= 0),
    completion_tokens integer     NOT NULL DEFAULT 0
                                  CONSTRAINT usage_completion_tokens_check CHECK (completion_tokens >= 0),
    cached            boolean     NOT NULL DEFAULT false,
    latency_ms        integer     CONSTRAINT usage_latency_ms_check CHECK (latency_ms >= 0),
    status            text        NOT NULL,
    worker            text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    cost              numeric(20,10),
    currency          text,
    org_id            bigint
) PARTITION BY RANGE (created_at);

-- The months of the rows stored, and those a record may still arrive for: records up to 35 days
-- old are accepted (records.py), and partitions.py keeps the current month and the next two
-- (MONTHS_AHEAD) made. Empty months in between cost a catalog entry each.
DO $$
DECLARE
    first_month date := date_trunc('month', LEAST((SELECT min(created_at) FROM usage_unpartitioned),
                                                  now() - interval '35 days') AT TIME ZONE 'UTC')::date;
    last_month  date := (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '2 months')::date;
    month       date := first_month;
BEGIN
    WHILE month <= last_month LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF usage FOR VALUES FROM (%L) TO (%L)',
                       'usage_' || to_char(month, 'YYYY_MM'), month::text || ' 00:00:00+00',
                       (month + interval '1 month')::date::text || ' 00:00:00+00');
        month := (month + interval '1 month')::date;
    END LOOP;
END $$;
CREATE TABLE usage_default PARTITION OF usage DEFAULT;

CREATE TABLE usage_request_ids (
    request_id text        PRIMARY KEY,
    created_at timestamptz NOT NULL  -- its usage row's: the retention prunes it with its month
);

INSERT INTO usage (id, request_id, user_id, key_id, model, prompt_hash, prompt_tokens, completion_tokens,
                   cached, latency_ms, status, worker, created_at, cost, currency, org_id)
OVERRIDING SYSTEM VALUE
SELECT id, request_id, user_id, key_id, model, prompt_hash, prompt_tokens, completion_tokens,
       cached, latency_ms, status, worker, created_at, cost, currency, org_id
FROM usage_unpartitioned;
INSERT INTO usage_request_ids (request_id, created_at) SELECT request_id, created_at FROM usage_unpartitioned;
-- New ids follow the old ones.
SELECT setval(pg_get_serial_sequence('usage', 'id'),
              COALESCE((SELECT max(id) FROM usage_unpartitioned), 0) + 1, false);
DROP TABLE usage_unpartitioned;

-- Indexes after the copy (one build each, not an insertion per row); their names are the old ones.
ALTER TABLE usage ADD PRIMARY KEY (id, created_at);
CREATE INDEX usage_user_created ON usage (user_id, created_at);
CREATE INDEX usage_created ON usage (created_at);
CREATE INDEX usage_request_id ON usage (request_id);
CREATE INDEX usage_request_ids_created ON usage_request_ids (created_at);
