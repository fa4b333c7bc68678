-- A key's model allow-list (`auth.create_key` / `auth.update_key`): the models
-- a request made with the key may name. NULL: every model. At most 64 names of
-- the catalog's pattern, checked by the service (services/auth/key_edits.py).
ALTER TABLE api_keys ADD COLUMN allowed_models text[];
