"""The SQLite backend: every line of SQL and every sqlite3 import lives here."""
