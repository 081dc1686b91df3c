"""Real processes for tests and benchmarks: a latency-sensitive victim and CPU hogs."""
