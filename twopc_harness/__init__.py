"""Local infrastructure for tests, the demo and the benchmarks: throw-away PostgreSQL
clusters, the daemons as real processes, and a Toxiproxy-compatible fault proxy.
Nothing in the daemons imports it."""
