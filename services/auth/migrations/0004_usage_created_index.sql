-- auth.active_users scans the last 24 hours of usage across all users.
CREATE INDEX usage_created ON usage (created_at);
