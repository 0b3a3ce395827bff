"""llm-proxy: a self-hosted, OpenAI-compatible gateway with short-lived tokens and an audit trail."""

__version__ = "0.1.0"
