"""The tamper-evident audit trail: the writer, the hash chain and its verification, masking."""
