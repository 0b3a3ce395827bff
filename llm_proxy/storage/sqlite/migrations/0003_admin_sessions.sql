-- llm-proxy on SQLite, migration 3: the admin console's sessions (SPEC §8), kept where the tokens are
-- so that a session works on every process and survives a restart. Only digests are stored: the
-- cookie holds the session id, and the management token that signed in is never kept.

CREATE TABLE admin_sessions (
    id_hash      TEXT PRIMARY KEY,         -- hex SHA-256 of the session id
    token_hash   TEXT NOT NULL,            -- hex SHA-256 of the management token that signed in
    created_at   REAL NOT NULL,            -- Unix time: the absolute timeout counts from it
    last_seen_at REAL NOT NULL             -- Unix time: the idle timeout counts from it
);
CREATE INDEX idx_admin_sessions_last_seen_at ON admin_sessions(last_seen_at);
