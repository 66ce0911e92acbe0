"""A deterministic simulation of the whole protocol: the real coordinator engine and
the real participant agents, run on virtual time against a simulated network,
decision log and PostgreSQL, with crashes and partitions, all driven by one seed.
`python -m tests.sim` runs many seeds or replays one (see tests/sim/__main__.py)."""
