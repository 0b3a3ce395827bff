"""Admission limits: rates, quotas, budgets, failed-authentication counts and the concurrency cap."""
