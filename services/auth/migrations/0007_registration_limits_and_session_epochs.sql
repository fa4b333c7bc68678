-- Registrations counted per source and for the whole service, in fixed
-- windows (services/auth/registration.py), before any hash is computed.
CREATE TABLE registration_counts (
    subject      text        PRIMARY KEY,
    window_start timestamptz NOT NULL,
    count        integer     NOT NULL
);

-- Every session token carries the epoch of its user when it was issued; a
-- password change or "log out everywhere" moves the epoch on, and auth refuses
-- every token of an older epoch from then on (gateways within their 1 s reuse).
ALTER TABLE users ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;
