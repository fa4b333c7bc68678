-- Long leases for keys far from their limit, recalled as the limit nears:
-- see services/gateway/README.md, "Limits", "Long leases".
--
-- A lease is `long` when it was granted with the counter so far from its
-- limit that, after the grant, 8 leases of the largest size asked
-- (`p_maxes`) per live gateway are still free: it then lives p_long_ms
-- instead of p_ttl_ms and claims a few requests ahead. Any grant that is
-- refused, or leaves fewer than 4 such leases per live
-- gateway, *recalls* every long lease of the key: it is long no more, its
-- `expires_at` comes down to at most p_ttl_ms + p_recall_ms from now, and
-- `recalled_at` tells its owner (through the owner's next heartbeat, which
-- comes within p_recall_ms) to give back what it does not use. So once a key
-- nears its limit, every unit of it comes back within a short lease's life
-- plus a heartbeat, as a refused request waits for.
--
-- Lock order, everywhere: counter rows in key order (subject and counter
-- compared as bytes, COLLATE "C", as the gateway sorts them), each before the
-- lease rows of its key; lease rows of one key in id order. Recalling another
-- gateway's lease happens under its key's counter row, so it keeps the order.
--
-- quota_turn (at the end) is one writer turn -- returns, grants, claims -- in
-- one transaction, the counter rows of all its keys locked first.

ALTER TABLE quota_leases
    ADD COLUMN long boolean NOT NULL DEFAULT false,
    ADD COLUMN recalled_at timestamptz;
CREATE INDEX quota_leases_long ON quota_leases (subject, counter, window_start) WHERE long;
CREATE INDEX quota_leases_recalled ON quota_leases (gateway) WHERE recalled_at IS NOT NULL;

DROP FUNCTION quota_grant(text, text, bigint, integer, bigint, text[], text[], timestamptz[], bigint[], bigint[],
                          bigint[], bigint[], bigint[], bigint[]);

-- As migration 0002's quota_grant (the rolling and calendar arithmetic is the
-- same), plus: p_long_ms (0: never long), p_recall_ms, and p_long_claims[i],
-- the claimed mark a long lease gets instead of p_claims[i]. `long` says
-- whether the lease is long after this grant.
CREATE FUNCTION quota_grant(
    p_gateway text, p_incarnation text, p_ttl_ms bigint, p_long_ms bigint, p_recall_ms bigint,
    p_live integer, p_now bigint,
    p_subjects text[], p_counters text[], p_windows timestamptz[], p_limits bigint[], p_units_us bigint[],
    p_needs bigint[], p_maxes bigint[], p_leases bigint[], p_claims bigint[], p_long_claims bigint[]
) RETURNS TABLE (
    idx integer, lease_id bigint, added bigint, units bigint, claimed bigint,
    granted bigint, limit_value bigint, others_units bigint, others_expiry timestamptz, long boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    i integer;
    q record;
    r record;
    u bigint;
    base bigint;
    have bigint;
    free bigint;
    g bigint;
    live bigint;
    far boolean;
BEGIN
    live := GREATEST(p_live, 1);
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
            g := LEAST(free, GREATEST(p_needs[i], LEAST(p_maxes[i], free / (4 * live))));
        ELSE
            g := 0;
        END IF;
        UPDATE quota_counters c
        SET granted = have + g, limit_value = p_limits[i], unit_us = u,
            tat = CASE WHEN u > 0 THEN base + g * u ELSE c.tat END, updated_at = now()
        WHERE c.subject = p_subjects[i] AND c.counter = p_counters[i] AND c.window_start = p_windows[i]
        RETURNING c.granted, c.limit_value INTO granted, limit_value;
        far := p_long_ms > 0 AND g > 0 AND free - g >= 8 * live * GREATEST(p_maxes[i], 1);
        IF g = 0 OR free - g < 4 * live * GREATEST(p_maxes[i], 1) THEN
            -- Near the limit: every long lease of the key is recalled (see the top).
            FOR r IN SELECT l.id FROM quota_leases l
                     WHERE l.subject = p_subjects[i] AND l.counter = p_counters[i]
                       AND l.window_start = p_windows[i] AND l.long
                     ORDER BY l.id FOR UPDATE LOOP
                UPDATE quota_leases l
                SET long = false, recalled_at = now(),
                    expires_at = LEAST(l.expires_at, now() + (p_ttl_ms + p_recall_ms) * interval '1 millisecond')
                WHERE l.id = r.id;
            END LOOP;
        END IF;
        added := g;
        lease_id := NULL;
        units := 0;
        claimed := 0;
        long := false;
        IF g > 0 AND p_leases[i] IS NOT NULL THEN
            UPDATE quota_leases l SET units = l.units + g,
                   claimed = LEAST(l.units + g, GREATEST(l.claimed, p_claims[i],
                                                         CASE WHEN l.long THEN p_long_claims[i] ELSE 0 END))
            WHERE l.id = p_leases[i] AND l.gateway = p_gateway AND l.incarnation = p_incarnation
            RETURNING l.id, l.units, l.claimed, l.long INTO lease_id, units, claimed, long;
        END IF;
        IF g > 0 AND lease_id IS NULL THEN
            INSERT INTO quota_leases AS l (gateway, incarnation, subject, counter, window_start,
                                           units, claimed, expires_at, long)
            VALUES (p_gateway, p_incarnation, p_subjects[i], p_counters[i], p_windows[i],
                    g, LEAST(g, CASE WHEN far THEN GREATEST(p_claims[i], p_long_claims[i]) ELSE p_claims[i] END),
                    now() + (CASE WHEN far THEN p_long_ms ELSE p_ttl_ms END) * interval '1 millisecond', far)
            RETURNING l.id, l.units, l.claimed, l.long INTO lease_id, units, claimed, long;
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

-- Claims, lease rows locked in key order (the lock order above: a claim may
-- meet another gateway's recall of the same lease). No counter row is needed:
-- raising `claimed` within `units` changes no count.
CREATE FUNCTION quota_claim(p_ids bigint[], p_targets bigint[])
RETURNS TABLE (lease_id bigint, claimed bigint, orphaned boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT l.id, l.subject, l.counter, l.window_start, x.target
        FROM unnest(p_ids, p_targets) AS x(id, target) JOIN quota_leases l ON l.id = x.id
        ORDER BY l.subject COLLATE "C", l.counter COLLATE "C", l.window_start, l.id
    LOOP
        UPDATE quota_leases l SET claimed = GREATEST(l.claimed, LEAST(l.units, c.target))
        WHERE l.id = c.id
        RETURNING l.id, l.claimed, l.orphaned_at IS NOT NULL INTO lease_id, claimed, orphaned;
        CONTINUE WHEN NOT FOUND;
        RETURN NEXT;
    END LOOP;
END $$;

-- The janitor's order compared as bytes too (0002's used the database's collation).
CREATE OR REPLACE FUNCTION quota_orphan(p_dead_after_ms bigint, p_grace_ms bigint, p_limit integer)
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
        ORDER BY x.subject COLLATE "C", x.counter COLLATE "C", x.window_start, x.id
        LIMIT p_limit
    LOOP
        PERFORM 1 FROM quota_counters q
        WHERE q.subject = c.subject AND q.counter = c.counter AND q.window_start = c.window_start
        FOR UPDATE;
        SELECT x.gateway, x.units, x.claimed INTO l FROM quota_leases x
        WHERE x.id = c.id AND x.orphaned_at IS NULL FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        UPDATE quota_leases x SET units = x.claimed, orphaned_at = now(), long = false WHERE x.id = c.id;
        PERFORM quota_give_back(c.subject, c.counter, c.window_start, l.units - l.claimed);
        lease_id := c.id;
        gateway := l.gateway;
        returned := l.units - l.claimed;
        RETURN NEXT;
    END LOOP;
END $$;

-- One writer turn of a gateway in one transaction: its returns, then its
-- grants, then its claims (as quota_release, quota_grant and quota_claim do
-- them), with the counter rows of every key involved locked first, in key
-- order (and created for the grants' keys). Every lease row it then touches
-- -- its own, and long leases it recalls -- belongs to a key whose counter
-- row it holds, so it never waits on a lease row. Rows out: `kind` 'r'
-- (lease_id, returned, granted), 'g' (idx: the grant item, then as
-- quota_grant), 'c' (lease_id, claimed, orphaned).
CREATE FUNCTION quota_turn(
    p_gateway text, p_incarnation text, p_ttl_ms bigint, p_long_ms bigint, p_recall_ms bigint,
    p_live integer, p_now bigint,
    p_release_ids bigint[], p_release_used bigint[], p_release_close boolean[],
    p_subjects text[], p_counters text[], p_windows timestamptz[], p_limits bigint[], p_units_us bigint[],
    p_needs bigint[], p_maxes bigint[], p_leases bigint[], p_claims bigint[], p_long_claims bigint[],
    p_claim_ids bigint[], p_claim_targets bigint[]
) RETURNS TABLE (
    kind text, idx integer, lease_id bigint, added bigint, units bigint, claimed bigint,
    granted bigint, limit_value bigint, others_units bigint, others_expiry timestamptz, long boolean,
    returned bigint, orphaned boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    k record;
BEGIN
    FOR k IN
        SELECT x.s, x.c, x.w, max(x.lim) AS lim, max(x.uu) AS uu FROM (
            SELECT l.subject AS s, l.counter AS c, l.window_start AS w, NULL::bigint AS lim, NULL::bigint AS uu
            FROM quota_leases l
            WHERE l.id = ANY (coalesce(p_release_ids, '{}') || coalesce(p_claim_ids, '{}'))
            UNION ALL
            SELECT g.s, g.c, g.w, g.lim, g.uu
            FROM unnest(p_subjects, p_counters, p_windows, p_limits, p_units_us) AS g(s, c, w, lim, uu)
        ) x
        GROUP BY x.s, x.c, x.w
        ORDER BY x.s COLLATE "C", x.c COLLATE "C", x.w
    LOOP
        IF k.lim IS NOT NULL THEN
            INSERT INTO quota_counters (subject, counter, window_start, limit_value, unit_us)
            VALUES (k.s, k.c, k.w, k.lim, k.uu)
            ON CONFLICT DO NOTHING;
        END IF;
        PERFORM 1 FROM quota_counters q
        WHERE q.subject = k.s AND q.counter = k.c AND q.window_start = k.w
        FOR UPDATE;
    END LOOP;
    RETURN QUERY
        SELECT 'r'::text, NULL::integer, r.lease_id, NULL::bigint, NULL::bigint, NULL::bigint, r.granted,
               NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::boolean, r.returned, NULL::boolean
        FROM quota_release(p_release_ids, p_release_used, p_release_close) r;
    RETURN QUERY
        SELECT 'g'::text, g.idx, g.lease_id, g.added, g.units, g.claimed, g.granted, g.limit_value,
               g.others_units, g.others_expiry, g.long, NULL::bigint, NULL::boolean
        FROM quota_grant(p_gateway, p_incarnation, p_ttl_ms, p_long_ms, p_recall_ms, p_live, p_now,
                         p_subjects, p_counters, p_windows, p_limits, p_units_us, p_needs, p_maxes,
                         p_leases, p_claims, p_long_claims) g;
    RETURN QUERY
        SELECT 'c'::text, NULL::integer, c.lease_id, NULL::bigint, NULL::bigint, c.claimed, NULL::bigint,
               NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::boolean, NULL::bigint, c.orphaned
        FROM quota_claim(p_claim_ids, p_claim_targets) c;
END $$;
