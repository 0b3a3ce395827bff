-- llm-proxy schema, version 1. Idempotent: applied at every startup, before the numbered migrations
-- (migrations/NNNN_name.sql), which change some of these tables: read those too.
-- Timestamps are UTC ISO-8601 text ending in "Z" (fixed width, so they sort as text).

CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS projects (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    api_key_encrypted TEXT NOT NULL,          -- "enc:v1:" + base64(nonce || AES-256-GCM ciphertext)
    api_key_hint      TEXT NOT NULL,          -- obfuscated form, for display only
    is_active         INTEGER NOT NULL DEFAULT 1,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS tokens (
    id                    TEXT PRIMARY KEY,
    token_hash            TEXT NOT NULL UNIQUE,   -- hex SHA-256 of the plaintext token
    token_hint            TEXT NOT NULL,          -- obfuscated form, for display only
    project_id            TEXT NOT NULL REFERENCES projects(id),
    expires_at            TEXT NOT NULL,
    is_active             INTEGER NOT NULL DEFAULT 1,
    max_requests          INTEGER,
    rate_limit_per_minute INTEGER,
    max_tokens_total      INTEGER,
    request_count         INTEGER NOT NULL DEFAULT 0,
    prompt_tokens         INTEGER NOT NULL DEFAULT 0,
    completion_tokens     INTEGER NOT NULL DEFAULT 0,
    total_tokens          INTEGER NOT NULL DEFAULT 0,
    last_used_at          TEXT,
    created_at            TEXT NOT NULL,
    revoked_at            TEXT,
    replaced_by           TEXT
);
CREATE INDEX IF NOT EXISTS idx_tokens_project_id ON tokens(project_id);
CREATE INDEX IF NOT EXISTS idx_tokens_expires_at ON tokens(expires_at);

CREATE TABLE IF NOT EXISTS audit_events (
    seq        INTEGER PRIMARY KEY,
    timestamp  TEXT NOT NULL,
    action     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    project_id TEXT,
    request_id TEXT,
    client_ip  TEXT,
    result     TEXT NOT NULL,
    details    TEXT,                              -- JSON object
    hash       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_audit_events_timestamp ON audit_events(timestamp);
CREATE INDEX IF NOT EXISTS idx_audit_events_action ON audit_events(action);
CREATE INDEX IF NOT EXISTS idx_audit_events_project_id ON audit_events(project_id);

-- The head of the audit hash chain, kept even when events are not stored in the database,
-- so that seq and hash continue across restarts, rotations and prunes.
CREATE TABLE IF NOT EXISTS audit_chain (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);

-- Per-project daily totals, added to in batches by the token store (never on the request path).
CREATE TABLE IF NOT EXISTS usage_daily (
    project_id        TEXT NOT NULL,
    day               TEXT NOT NULL,          -- UTC date, YYYY-MM-DD
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, day)
);
