-- Central Butler registry and APDB databases of the docker-compose stack.
-- Butler's PostgreSQL registry needs btree_gist (timespan exclusion constraints).
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE DATABASE apdb;
\connect apdb
CREATE EXTENSION IF NOT EXISTS btree_gist;
