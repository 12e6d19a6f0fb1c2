"""Benchmark of the product against the report's approach and the peers (a tool about the product, not shipped)."""
