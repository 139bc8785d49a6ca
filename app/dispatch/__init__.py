"""Dispatchers: how a preprocessed sample reaches a model and its result comes back.

One interface (`base.Dispatcher`), two implementations: `local.LocalDispatcher` (embedded, in-process
batching; the default) and `redis_streams.RedisDispatcher` (Redis Streams + `s2amnet worker`).
"""
