"""The engine: per-request state, paged KV blocks, scheduling, model execution, async driver."""
