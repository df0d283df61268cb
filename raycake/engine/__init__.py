"""One serving instance without Ray: the KV cache, the scheduler, the runner, the sampler and
the engine that ties them together; speculative decoding in ``engine/spec/``."""
