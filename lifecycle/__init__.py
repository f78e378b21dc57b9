"""Lifecycle and scale: jobs a data team schedules over the other packages (continual
refresh, sharded batch jobs over all customers / products).

May import ``towers``, ``training``, ``segments`` and ``indexing``; ``serving`` may import
it; nothing here imports ``serving``.
"""
