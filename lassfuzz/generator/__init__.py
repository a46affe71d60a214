"""Random test-case generation, deterministic from a seed and a case index."""
