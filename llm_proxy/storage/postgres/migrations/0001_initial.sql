-- llm-proxy on PostgreSQL, migration 1: the tables of the SQLite schema (storage/sqlite/schema.sql).
-- Applied once, in a transaction, under the migration lock (database.py); recorded in schema_migrations.
-- Timestamps are UTC ISO-8601 text ending in "Z", as in SQLite: fixed width, and COLLATE "C" so they
-- compare and sort bytewise whatever the database's locale.

CREATE TABLE projects (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    api_key_encrypted TEXT NOT NULL,          -- "enc:v1:" + base64(nonce || AES-256-GCM ciphertext)
    api_key_hint      TEXT NOT NULL,          -- obfuscated form, for display only
    is_active         BOOLEAN NOT NULL DEFAULT TRUE,
    created_at        TEXT COLLATE "C" NOT NULL,
    updated_at        TEXT COLLATE "C" NOT NULL,
    created_order     BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE  -- ties within a second (SQLite's rowid)
);

CREATE TABLE tokens (
    id                    TEXT PRIMARY KEY,
    token_hash            TEXT NOT NULL UNIQUE,   -- hex SHA-256 of the plaintext token
    token_hint            TEXT NOT NULL,          -- obfuscated form, for display only
    project_id            TEXT NOT NULL REFERENCES projects(id),
    expires_at            TEXT COLLATE "C" NOT NULL,
    is_active             BOOLEAN NOT NULL DEFAULT TRUE,
    max_requests          BIGINT,
    rate_limit_per_minute BIGINT,
    max_tokens_total      BIGINT,
    request_count         BIGINT NOT NULL DEFAULT 0,
    prompt_tokens         BIGINT NOT NULL DEFAULT 0,
    completion_tokens     BIGINT NOT NULL DEFAULT 0,
    total_tokens          BIGINT NOT NULL DEFAULT 0,
    last_used_at          TEXT COLLATE "C",
    created_at            TEXT COLLATE "C" NOT NULL,
    revoked_at            TEXT COLLATE "C",
    replaced_by           TEXT,
    created_order         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);
CREATE INDEX idx_tokens_project_id ON tokens(project_id);
CREATE INDEX idx_tokens_expires_at ON tokens(expires_at);

CREATE TABLE audit_events (
    seq        BIGINT PRIMARY KEY,
    timestamp  TEXT COLLATE "C" NOT NULL,
    action     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    project_id TEXT,
    request_id TEXT,
    client_ip  TEXT,
    result     TEXT NOT NULL,
    details    TEXT,                          -- the JSON object exactly as hashed (jsonb would reorder its keys)
    hash       TEXT NOT NULL
);
CREATE INDEX idx_audit_events_timestamp ON audit_events(timestamp);
CREATE INDEX idx_audit_events_action ON audit_events(action);
CREATE INDEX idx_audit_events_project_id ON audit_events(project_id);

-- The head of the audit hash chain, kept even when events are not stored in the database, so that
-- seq and hash continue across restarts, rotations and prunes. Its one row exists from the start:
-- every writer locks it (SELECT … FOR UPDATE) for the whole of its transaction.
CREATE TABLE audit_chain (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_chain (id, seq, hash) VALUES (1, 0, repeat('0', 64));

-- Per-project daily totals, added to in batches by the token store (never on the request path).
CREATE TABLE usage_daily (
    project_id        TEXT NOT NULL,
    day               TEXT COLLATE "C" NOT NULL,   -- UTC date, YYYY-MM-DD
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, day)
);
