-- Key rotation (`auth.rotate_key`): a key made to replace another names it, so
-- the keys list can show the chain. NULL: made by `auth.create_key`. A key
-- whose predecessor is gone (its user deleted) keeps nothing dangling.
ALTER TABLE api_keys ADD COLUMN rotated_from bigint REFERENCES api_keys (id) ON DELETE SET NULL;
