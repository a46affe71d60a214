"""Comparing outcomes: the first divergence and its signature."""
