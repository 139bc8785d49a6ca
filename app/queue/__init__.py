"""The Redis mode's shared vocabulary, laid out like the `arq` library.

- `constants`: stream and key names, the consumer group, the bounds of the reply / dead-letter streams;
- `jobs`: the wire format of a job (stream entry fields) and of a reply, the reply statuses, and
  `JobEntry`, a job as a worker holds it (expiry judged on Redis's clock);
- `connections`: the Redis client factories, `CONNECTION_ERRORS` and consumer-group creation.

The API side (`app.dispatch.redis_streams.RedisDispatcher`, `app.idempotency_redis`) and the worker
(`app.worker`) import all of it from here; changing anything here changes what is stored in Redis.
"""
