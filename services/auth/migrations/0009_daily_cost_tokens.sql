-- Tokens per user, key, UTC day, model and currency, beside the cost
-- (`auth.report` by model reads only the daily tables: usage_daily has no model).
-- Kept in the same statement as the inserts, like the other daily columns.
ALTER TABLE usage_daily_costs
    ADD COLUMN prompt_tokens     bigint NOT NULL DEFAULT 0,
    ADD COLUMN completion_tokens bigint NOT NULL DEFAULT 0;

-- The usage stored before this migration (usage rows are never pruned, so the
-- sums are those of the rows each daily row was built from).
UPDATE usage_daily_costs c
SET prompt_tokens = s.prompt_tokens, completion_tokens = s.completion_tokens
FROM (SELECT user_id, key_id, (created_at AT TIME ZONE 'UTC')::date AS day, model,
             COALESCE(currency, '') AS currency, sum(prompt_tokens) AS prompt_tokens,
             sum(completion_tokens) AS completion_tokens
      FROM usage GROUP BY 1, 2, 3, 4, 5) s
WHERE c.user_id = s.user_id AND COALESCE(c.key_id, 0) = COALESCE(s.key_id, 0) AND c.day = s.day
  AND c.model = s.model AND c.currency = s.currency;
