-- Limits per scope, and rolling limits: see services/gateway/README.md, "Limits".
--
-- A counter belongs to a *subject*: "u:<user id>", "k:<key id>", "o:<org id>"
-- (a request needs units of every counter of every subject it answers to:
-- the tighter of key, user and organisation applies by construction).
--
-- A rolling counter (`requests_per_hour`) is a GCRA: `tat` (the theoretical
-- arrival time, epoch microseconds) moves `unit_us` (the limit's period /
-- limit, rounded up) per unit granted, from `now` or from where it is if
-- later; a grant of g is allowed when `tat` would end at most limit x unit_us
-- past `now`, and a return of r moves it back r x unit_us. So over any span
-- t, at most limit + t / unit_us units are granted: a burst of the limit,
-- then one unit every unit_us -- never the 2 x limit a calendar hour lets
-- through across its end. Its `window_start` is the epoch, one row per
-- subject; `granted` is the units outstanding as of the last change.

ALTER TABLE quota_leases DROP CONSTRAINT quota_leases_user_id_counter_window_start_fkey;
DROP INDEX quota_leases_key;
ALTER TABLE quota_counters DROP CONSTRAINT quota_counters_pkey;

ALTER TABLE quota_counters ALTER COLUMN user_id TYPE text USING 'u:' || user_id;
ALTER TABLE quota_counters RENAME COLUMN user_id TO subject;
ALTER TABLE quota_counters
    ADD COLUMN tat bigint NOT NULL DEFAULT 0,
    ADD COLUMN unit_us bigint NOT NULL DEFAULT 0 CHECK (unit_us >= 0);
ALTER TABLE quota_counters ADD PRIMARY KEY (subject, counter, window_start);

ALTER TABLE quota_leases ALTER COLUMN user_id TYPE text USING 'u:' || user_id;
ALTER TABLE quota_leases RENAME COLUMN user_id TO subject;
ALTER TABLE quota_leases ADD FOREIGN KEY (subject, counter, window_start)
    REFERENCES quota_counters (subject, counter, window_start) ON DELETE CASCADE;
CREATE INDEX quota_leases_key ON quota_leases (subject, counter, window_start);

DROP FUNCTION quota_grant(text, text, bigint, integer, bigint[], text[], timestamptz[], bigint[],
                          bigint[], bigint[], bigint[], bigint[]);
DROP FUNCTION quota_release(bigint[], bigint[], boolean[]);
DROP FUNCTION quota_orphan(bigint, bigint, integer);

-- Give back r units of a counter (the row is locked by the caller).
CREATE FUNCTION quota_give_back(p_subject text, p_counter text, p_window timestamptz, r bigint)
RETURNS bigint LANGUAGE sql AS $$
    UPDATE quota_counters q
    SET granted = GREATEST(q.granted - r, 0),
        tat = CASE WHEN q.unit_us > 0 THEN q.tat - r * q.unit_us ELSE q.tat END,
        updated_at = now()
    WHERE q.subject = p_subject AND q.counter = p_counter AND q.window_start = p_window
    RETURNING q.granted
$$;

-- Grant units for several (subject, counter, window) keys in one call.
-- Item i asks for at least p_needs[i] units (else nothing), at most
-- p_maxes[i], and no more than a 1/(4 x live gateways) share of what remains,
-- so that leases shrink to exactly one request's need near the limit.
-- p_units_us[i] > 0 makes it rolling (above), with p_now (epoch us, the
-- gateway's clock, as calendar windows are) as now. With p_leases[i] the
-- units top up that lease of this gateway; otherwise a new lease is made.
-- Counter rows are locked before lease rows, everywhere. When nothing is
-- granted, others_units / others_expiry say what other gateways still hold in
-- leases (which their owners trim when they expire); `granted` is the units
-- outstanding (for a rolling counter, at p_now).
CREATE FUNCTION quota_grant(
    p_gateway text, p_incarnation text, p_ttl_ms bigint, p_live integer, p_now bigint,
    p_subjects text[], p_counters text[], p_windows timestamptz[], p_limits bigint[], p_units_us bigint[],
    p_needs bigint[], p_maxes bigint[], p_leases bigint[], p_claims bigint[]
) RETURNS TABLE (
    idx integer, lease_id bigint, added bigint, units bigint, claimed bigint,
    granted bigint, limit_value bigint, others_units bigint, others_expiry timestamptz
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    i integer;
    q record;
    u bigint;
    base bigint;
    have bigint;
    free bigint;
    g bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_subjects, 1), 0) LOOP
        idx := i;
        u := p_units_us[i];
        INSERT INTO quota_counters AS c (subject, counter, window_start, limit_value, unit_us)
        VALUES (p_subjects[i], p_counters[i], p_windows[i], p_limits[i], u)
        ON CONFLICT DO NOTHING;
        SELECT c.granted, c.tat, c.unit_us INTO q FROM quota_counters c
        WHERE c.subject = p_subjects[i] AND c.counter = p_counters[i] AND c.window_start = p_windows[i]
        FOR UPDATE;
        IF u > 0 THEN
            base := GREATEST(q.tat, p_now);
            have := (base - p_now + q.unit_us - 1) / GREATEST(q.unit_us, 1);  -- whole units, rounded up
            IF q.unit_us <> u THEN  -- the limit changed: the same units outstanding, at the new pace
                base := p_now + have * u;
            END IF;
        ELSE
            have := q.granted;
        END IF;
        free := p_limits[i] - have;
        IF free >= p_needs[i] AND p_needs[i] > 0 THEN
            g := LEAST(free, GREATEST(p_needs[i], LEAST(p_maxes[i], free / (4 * GREATEST(p_live, 1)))));
        ELSE
            g := 0;
        END IF;
        UPDATE quota_counters c
        SET granted = have + g, limit_value = p_limits[i], unit_us = u,
            tat = CASE WHEN u > 0 THEN base + g * u ELSE c.tat END, updated_at = now()
        WHERE c.subject = p_subjects[i] AND c.counter = p_counters[i] AND c.window_start = p_windows[i]
        RETURNING c.granted, c.limit_value INTO granted, limit_value;
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
            INSERT INTO quota_leases AS l (gateway, incarnation, subject, counter, window_start,
                                           units, claimed, expires_at)
            VALUES (p_gateway, p_incarnation, p_subjects[i], p_counters[i], p_windows[i],
                    g, LEAST(g, p_claims[i]), now() + p_ttl_ms * interval '1 millisecond')
            RETURNING l.id, l.units, l.claimed INTO lease_id, units, claimed;
        END IF;
        others_units := 0;
        others_expiry := NULL;
        IF g = 0 THEN
            SELECT coalesce(sum(l.units), 0), max(l.expires_at) INTO others_units, others_expiry
            FROM quota_leases l
            WHERE l.subject = p_subjects[i] AND l.counter = p_counters[i] AND l.window_start = p_windows[i]
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
        SELECT l.subject, l.counter, l.window_start INTO k FROM quota_leases l WHERE l.id = p_ids[i];
        CONTINUE WHEN NOT FOUND;
        PERFORM 1 FROM quota_counters q
        WHERE q.subject = k.subject AND q.counter = k.counter AND q.window_start = k.window_start
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
        granted := quota_give_back(k.subject, k.counter, k.window_start, r);
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
        SELECT x.id, x.subject, x.counter, x.window_start FROM quota_leases x
        LEFT JOIN gateways g ON g.id = x.gateway
        WHERE x.orphaned_at IS NULL
          AND x.expires_at < now() - p_grace_ms * interval '1 millisecond'
          AND (g.id IS NULL OR g.incarnation <> x.incarnation
               OR g.last_seen < now() - p_dead_after_ms * interval '1 millisecond')
        ORDER BY x.subject, x.counter, x.window_start, x.id
        LIMIT p_limit
    LOOP
        PERFORM 1 FROM quota_counters q
        WHERE q.subject = c.subject AND q.counter = c.counter AND q.window_start = c.window_start
        FOR UPDATE;
        SELECT x.gateway, x.units, x.claimed INTO l FROM quota_leases x
        WHERE x.id = c.id AND x.orphaned_at IS NULL FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        UPDATE quota_leases x SET units = x.claimed, orphaned_at = now() WHERE x.id = c.id;
        PERFORM quota_give_back(c.subject, c.counter, c.window_start, l.units - l.claimed);
        lease_id := c.id;
        gateway := l.gateway;
        returned := l.units - l.claimed;
        RETURN NEXT;
    END LOOP;
END $$;
