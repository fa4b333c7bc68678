-- Organisations (services/auth/README.md, "Organisations"): a shared set of
-- limits and budgets over the keys of its members, and a report of their usage.
--
-- An organisation's name is unique in its folded form (`validation.fold`,
-- computed in Python and stored in `name_key`, as for usernames): "Acme" and
-- "ACME" are one organisation, whatever the database's locale. Its limits are
-- the tiers' five (NULL: none); a gateway enforces them over every key of the
-- organisation together (the scope "org").
CREATE TABLE orgs (
    id                 bigint        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name               text          NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64),
    name_key           text          NOT NULL UNIQUE,
    created_at         timestamptz   NOT NULL DEFAULT now(),
    created_by         bigint        REFERENCES users (id) ON DELETE SET NULL,
    requests_per_hour  bigint        CHECK (requests_per_hour >= 0),
    requests_per_month bigint        CHECK (requests_per_month >= 0),
    tokens_per_month   bigint        CHECK (tokens_per_month >= 0),
    spend_per_day      numeric(18,6) CHECK (spend_per_day >= 0),
    spend_per_month    numeric(18,6) CHECK (spend_per_month >= 0)
);

CREATE TABLE org_members (
    org_id    bigint      NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id   bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      text        NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX org_members_user ON org_members (user_id);

-- An invitation names the account (found by its folded username when invited),
-- and is answered once: accepted or declined. One pending invitation per account
-- and organisation.
CREATE TABLE org_invites (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      bigint      NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id     bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text        NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    invited_by  bigint      REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    accepted_at timestamptz,
    declined_at timestamptz,
    CHECK (accepted_at IS NULL OR declined_at IS NULL)
);
CREATE UNIQUE INDEX org_invites_pending ON org_invites (org_id, user_id)
    WHERE accepted_at IS NULL AND declined_at IS NULL;
CREATE INDEX org_invites_user ON org_invites (user_id) WHERE accepted_at IS NULL AND declined_at IS NULL;

-- An organisation's key (NULL: a personal key). Its owner is billed for its
-- usage; the organisation's limits apply to it, and its usage is attributed to
-- the organisation too. A key never changes organisation.
ALTER TABLE api_keys ADD COLUMN org_id bigint REFERENCES orgs (id);
CREATE INDEX api_keys_org ON api_keys (org_id) WHERE org_id IS NOT NULL;

-- The organisation a record is attributed to: its key's, taken by the statement
-- that records usage (gateways' records do not name it). A daily row's org_id
-- follows from its key_id, so the unique index of the daily rows is unchanged.
ALTER TABLE usage ADD COLUMN org_id bigint;
ALTER TABLE usage_daily_costs ADD COLUMN org_id bigint;
CREATE INDEX usage_daily_costs_org ON usage_daily_costs (org_id, day) WHERE org_id IS NOT NULL;
