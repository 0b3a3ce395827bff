"""The PostgreSQL backend (the `postgres` extra): every line of its SQL and every asyncpg import lives here."""
