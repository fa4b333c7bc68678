-- Run once by the official postgres image on an empty volume
-- (/docker-entrypoint-initdb.d): one database per service that reads DATABASE_URL.
-- auth: accounts, API keys, usage. gateway: shared limits (every gateway of the mesh).
-- The metrics service keeps no database (it reads no DATABASE_URL).
CREATE DATABASE auth;
CREATE DATABASE gateway;
