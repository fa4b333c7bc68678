-- Administrators are granted by the operator only (auth.grant_admin, run by
-- `inferswarm admin grant` with the mesh secret). Until now is_admin followed
-- INFERSWARM_ADMIN_EMAILS, addresses nobody verified: whoever registered a
-- listed address first became admin. No such grant can be trusted, so every
-- one is withdrawn here (and recorded); the operator grants admins again.
INSERT INTO audit_log (event, user_id, actor_id, details)
SELECT 'admin_revoked', id, NULL, '{"reason": "INFERSWARM_ADMIN_EMAILS retired: admins are granted by the operator"}'
FROM users WHERE is_admin;
UPDATE users SET is_admin = false WHERE is_admin;

-- Usernames and emails are compared in the form the auth service computes in
-- Python (services/auth/validation.py `fold`: NFKC, casefold), never through
-- PostgreSQL's lower(), whose answer depends on the database's locale.
-- AuthStore.fill_folded_names fills the columns of existing accounts at start;
-- a column stays NULL only for an account whose folded name an older account
-- already holds: that one is found by its exact stored name only.
ALTER TABLE users ADD COLUMN username_key text, ADD COLUMN email_key text;
CREATE UNIQUE INDEX users_username_fold ON users (username_key);
CREATE UNIQUE INDEX users_email_fold ON users (email_key);
CREATE INDEX users_username_unfolded ON users (username) WHERE username_key IS NULL;
CREATE INDEX users_email_unfolded ON users (email) WHERE email_key IS NULL;
