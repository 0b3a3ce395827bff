"""The PostgreSQL schema as numbered migrations, NNNN_name.sql, applied in order (database.py)."""
