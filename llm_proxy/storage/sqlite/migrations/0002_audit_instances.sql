-- llm-proxy on SQLite, migration 2: one audit hash chain per instance (SPEC §7).
-- Every INSTANCE_ID keeps its own chain: `seq` counts within it, so (instance, seq) is the key of an
-- event, and `id` is the order events were stored in, across chains (GET /manage/audit pages by it;
-- AUTOINCREMENT: an id is never given twice, even after a prune deleted the newest rows). Events
-- written before this migration carry no instance: they keep theirs, '', and an event's JSON has no
-- `instance` key when it is ''. SQLite cannot change a primary key in place: the tables are rebuilt.
-- Statements are separated by semicolons at the end of a line (the runner splits on them).

CREATE TABLE audit_events_v2 (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    instance   TEXT NOT NULL DEFAULT '',
    seq        INTEGER NOT NULL,
    timestamp  TEXT NOT NULL,
    action     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    project_id TEXT,
    request_id TEXT,
    client_ip  TEXT,
    result     TEXT NOT NULL,
    details    TEXT,
    hash       TEXT NOT NULL,
    UNIQUE (instance, seq)
);
INSERT INTO audit_events_v2 (id, instance, seq, timestamp, action, actor, project_id, request_id, client_ip,
                             result, details, hash)
    SELECT seq, '', seq, timestamp, action, actor, project_id, request_id, client_ip, result, details, hash
    FROM audit_events ORDER BY seq;
DROP TABLE audit_events;
ALTER TABLE audit_events_v2 RENAME TO audit_events;
CREATE INDEX idx_audit_events_timestamp ON audit_events(timestamp);
CREATE INDEX idx_audit_events_action ON audit_events(action);
CREATE INDEX idx_audit_events_project_id ON audit_events(project_id);

-- The head of each chain, kept even when events are not stored in the database.
CREATE TABLE audit_chain_v2 (
    instance TEXT PRIMARY KEY,
    seq      INTEGER NOT NULL,
    hash     TEXT NOT NULL
);
INSERT INTO audit_chain_v2 (instance, seq, hash) SELECT '', seq, hash FROM audit_chain WHERE seq > 0;
DROP TABLE audit_chain;
ALTER TABLE audit_chain_v2 RENAME TO audit_chain;
