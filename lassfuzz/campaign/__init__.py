"""Campaigns: the fuzzing loop, crash files, statistics and minimization."""
