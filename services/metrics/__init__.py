"""The metrics service: the Prometheus view of the whole mesh, and system health (see README.md)."""
