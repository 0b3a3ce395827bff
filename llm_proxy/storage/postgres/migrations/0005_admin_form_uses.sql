-- llm-proxy on PostgreSQL, migration 5: the console's single-use forms. A form that makes something that
-- cannot be shown twice (a token: its plaintext appears once) carries a random value; its SHA-256 is
-- recorded here when the form is sent, so a reload that sends it again is refused instead of making a
-- second token. Rows go when their session could no longer be alive.

CREATE TABLE admin_form_uses (
    once_hash    TEXT PRIMARY KEY,         -- hex SHA-256 of the form's single-use value
    session_hash TEXT NOT NULL,            -- hex SHA-256 of the session id that sent it
    used_at      DOUBLE PRECISION NOT NULL -- Unix time
);
CREATE INDEX idx_admin_form_uses_used_at ON admin_form_uses(used_at);
