"""The serving engine: request state, scheduling, KV caches and the model runner."""
