-- Limits that hold across any number of gateways: see services/gateway/README.md, "Limits".
--
-- quota_counters: per user, counter and window, how many units were handed to
-- gateways (as leases). Every grant is `granted + n <= limit`, under the row lock.
-- quota_leases: who holds which units now. `claimed` is written ahead of use:
-- the owner never admits beyond it, so anyone may give back `units - claimed`
-- of a dead gateway's lease without ever returning a unit that was used.
-- gateways: heartbeats, to size leases by the live fleet and to find the dead.

CREATE TABLE quota_counters (
    user_id      bigint      NOT NULL,
    counter      text        NOT NULL,
    window_start timestamptz NOT NULL,
    limit_value  bigint      NOT NULL CHECK (limit_value >= 0),
    granted      bigint      NOT NULL DEFAULT 0 CHECK (granted >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, counter, window_start)
);

CREATE TABLE quota_leases (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gateway      text        NOT NULL,
    incarnation  text        NOT NULL,
    user_id      bigint      NOT NULL,
    counter      text        NOT NULL,
    window_start timestamptz NOT NULL,
    units        bigint      NOT NULL CHECK (units >= 0),
    claimed      bigint      NOT NULL CHECK (claimed >= 0 AND claimed <= units),
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    orphaned_at  timestamptz,
    FOREIGN KEY (user_id, counter, window_start)
        REFERENCES quota_counters (user_id, counter, window_start) ON DELETE CASCADE
);
CREATE INDEX quota_leases_key ON quota_leases (user_id, counter, window_start);
CREATE INDEX quota_leases_gateway ON quota_leases (gateway);

CREATE TABLE gateways (
    id          text        PRIMARY KEY,
    incarnation text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- Grant units for several (user, counter, window) keys in one call.
-- Item i asks for at least p_needs[i] units (else nothing), at most
-- p_maxes[i], and no more than a 1/(4 x live gateways) share of what remains,
-- so that leases shrink to exactly one request's need near the limit.
-- With p_leases[i] the units top up that lease of this gateway; otherwise a
-- new lease is made. Counter rows are locked before lease rows, everywhere.
-- When nothing is granted, others_units / others_expiry say what other
-- gateways still hold in leases (which their owners trim when they expire).
CREATE FUNCTION quota_grant(
    p_gateway text, p_incarnation text, p_ttl_ms bigint, p_live integer,
    p_users bigint[], p_counters text[], p_windows timestamptz[], p_limits bigint[],
    p_needs bigint[], p_maxes bigint[], p_leases bigint[], p_claims bigint[]
) RETURNS TABLE (
    idx integer, lease_id bigint, added bigint, units bigint, claimed bigint,
    granted bigint, limit_value bigint, others_units bigint, others_expiry timestamptz
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
#variable_conflict use_column
DECLARE
    i integer;
    have bigint;
    free bigint;
    g bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_users, 1), 0) LOOP
        idx := i;
        INSERT INTO quota_counters AS q (user_id, counter, window_start, limit_value)
        VALUES (p_users[i], p_counters[i], p_windows[i], p_limits[i])
        ON CONFLICT DO NOTHING;
        SELECT q.granted INTO have FROM quota_counters q
        WHERE q.user_id = p_users[i] AND q.counter = p_counters[i] AND q.window_start = p_windows[i]
        FOR UPDATE;
        free := p_limits[i] - have;
        IF free >= p_needs[i] AND p_needs[i] > 0 THEN
            g := LEAST(free, GREATEST(p_needs[i], LEAST(p_maxes[i], free / (4 * GREATEST(p_live, 1)))));
        ELSE
            g := 0;
        END IF;
        UPDATE quota_counters q SET granted = q.granted + g, limit_value = p_limits[i], updated_at = now()
        WHERE q.user_id = p_users[i] AND q.counter = p_counters[i] AND q.window_start = p_windows[i]
        RETURNING q.granted, q.limit_value INTO granted, limit_value;
        added := g;
        lease_id := NULL;
        units := 0;
        claimed := 0;
        IF g > 0 AND p_leases[i] IS NOT NULL THEN
            UPDATE quota_leases l SET units = l.units + g,
                   claimed = LEAST(l.units + g, GREATEST(l.claimed, p_claims[i]))
            WHERE l.id = p_leases[i] AND l.gateway = p_gateway AND l.incarnation = p_incarnation
            RETURNING l.id, l.units, l.claimed INTO lease_id, units, claimed;
        END IF;
        IF g > 0 AND lease_id IS NULL THEN
            INSERT INTO quota_leases AS l (gateway, incarnation, user_id, counter, window_start,
                                           units, claimed, expires_at)
            VALUES (p_gateway, p_incarnation, p_users[i], p_counters[i], p_windows[i],
                    g, LEAST(g, p_claims[i]), now() + p_ttl_ms * interval '1 millisecond')
            RETURNING l.id, l.units, l.claimed INTO lease_id, units, claimed;
        END IF;
        others_units := 0;
        others_expiry := NULL;
        IF g = 0 THEN
            SELECT coalesce(sum(l.units), 0), max(l.expires_at) INTO others_units, others_expiry
            FROM quota_leases l
            WHERE l.user_id = p_users[i] AND l.counter = p_counters[i] AND l.window_start = p_windows[i]
              AND l.gateway <> p_gateway AND l.units > 0 AND l.orphaned_at IS NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- Give back units of leases: lease i keeps exactly p_used[i] units (what its
-- requests used or still hold), the rest returns to its counter. With
-- p_close[i] the lease row is deleted too. Works the same on a lease a
-- janitor orphaned meanwhile (its units were cut to `claimed` >= used).
CREATE FUNCTION quota_release(p_ids bigint[], p_used bigint[], p_close boolean[])
RETURNS TABLE (lease_id bigint, returned bigint, granted bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    i integer;
    k record;
    have bigint;
    r bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        SELECT l.user_id, l.counter, l.window_start INTO k FROM quota_leases l WHERE l.id = p_ids[i];
        CONTINUE WHEN NOT FOUND;
        PERFORM 1 FROM quota_counters q
        WHERE q.user_id = k.user_id AND q.counter = k.counter AND q.window_start = k.window_start
        FOR UPDATE;
        SELECT l.units INTO have FROM quota_leases l WHERE l.id = p_ids[i] FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        r := GREATEST(have - p_used[i], 0);
        IF p_close[i] THEN
            DELETE FROM quota_leases l WHERE l.id = p_ids[i];
        ELSE
            UPDATE quota_leases l SET units = have - r, claimed = LEAST(l.claimed, have - r)
            WHERE l.id = p_ids[i];
        END IF;
        UPDATE quota_counters q SET granted = q.granted - r, updated_at = now()
        WHERE q.user_id = k.user_id AND q.counter = k.counter AND q.window_start = k.window_start
        RETURNING q.granted INTO granted;
        lease_id := p_ids[i];
        returned := r;
        RETURN NEXT;
    END LOOP;
END $$;

-- A janitor's move on a dead gateway's expired lease: give back what was
-- certainly never used (units - claimed) and keep the row, orphaned, so that
-- the owner, restarting with its journal, can still give back the rest exactly.
CREATE FUNCTION quota_orphan(p_dead_after_ms bigint, p_grace_ms bigint, p_limit integer)
RETURNS TABLE (lease_id bigint, gateway text, returned bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c record;
    l record;
BEGIN
    FOR c IN
        SELECT x.id, x.user_id, x.counter, x.window_start FROM quota_leases x
        LEFT JOIN gateways g ON g.id = x.gateway
        WHERE x.orphaned_at IS NULL
          AND x.expires_at < now() - p_grace_ms * interval '1 millisecond'
          AND (g.id IS NULL OR g.incarnation <> x.incarnation
               OR g.last_seen < now() - p_dead_after_ms * interval '1 millisecond')
        ORDER BY x.user_id, x.counter, x.window_start, x.id
        LIMIT p_limit
    LOOP
        PERFORM 1 FROM quota_counters q
        WHERE q.user_id = c.user_id AND q.counter = c.counter AND q.window_start = c.window_start
        FOR UPDATE;
        SELECT x.gateway, x.units, x.claimed INTO l FROM quota_leases x
        WHERE x.id = c.id AND x.orphaned_at IS NULL FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        UPDATE quota_leases x SET units = x.claimed, orphaned_at = now() WHERE x.id = c.id;
        UPDATE quota_counters q SET granted = q.granted - (l.units - l.claimed), updated_at = now()
        WHERE q.user_id = c.user_id AND q.counter = c.counter AND q.window_start = c.window_start;
        lease_id := c.id;
        gateway := l.gateway;
        returned := l.units - l.claimed;
        RETURN NEXT;
    END LOOP;
END $$;
