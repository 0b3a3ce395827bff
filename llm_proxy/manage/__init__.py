"""The management API under /manage: handlers, body bounds, the OpenAPI document."""
