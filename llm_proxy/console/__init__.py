"""The admin console at /admin/: server-rendered pages on the management API's services."""
