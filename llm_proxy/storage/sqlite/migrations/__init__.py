"""The SQLite schema after version 1 (schema.sql): numbered migrations, NNNN_name.sql, applied in order."""
