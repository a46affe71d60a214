"""Campaigns: the supervisor and its workers, buckets, statistics, crash files, minimization.

Module map: ``work`` (chunks of case indices and the runner inside a worker), ``backend``
(where chunks run: local processes; ``cluster`` for Dask), ``supervisor`` (the loop that owns
the output directory), ``fuzz`` (options to a campaign config), ``buckets`` and ``known``
(dedup and suppression), ``stats`` and ``display`` (figures), ``coverage``, ``epochs`` and
``steering`` (decision-cell coverage and deterministic bias), ``health``, ``files`` (crash files,
atomic writes), ``minimize`` and ``program``.
"""
