"""Tokens: the in-memory cache the hot path reads, the one service that changes them, anomaly rules, expiry."""
