"""The /v1 request path: edge middleware, client auth, admission and the streaming forwarder."""
