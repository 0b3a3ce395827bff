"""Running the gateway: the command line, logs, metrics, health endpoints, TLS."""
