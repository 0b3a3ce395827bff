-- llm-proxy on PostgreSQL, migration 2: who serves the database.
-- A serving process holds a session-level advisory lock on a connection of its own (ownership.py) and
-- writes who it is here, so that a second one, refused the lock, can name it. The row is believed only
-- while its backend_pid holds the lock (pg_locks): one left behind by a killed process names nobody.

CREATE TABLE serving_owner (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    owner       TEXT NOT NULL,                -- "pid N on HOST since YYYY-MM-DDTHH:MM:SSZ"
    backend_pid INTEGER NOT NULL,             -- the server session that holds the lock (pg_backend_pid())
    claimed_at  TEXT COLLATE "C" NOT NULL
);
