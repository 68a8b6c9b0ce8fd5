"""Plain logic: decisions made from values, with no I/O and no clock reads (a time, when one matters, is passed
in). The connection's phases, the instance pool's decisions, how many instances a load needs, what a reload
changes, PROXY protocol headers.

Imports only activator.config and activator.errors; tested without sockets or an engine (tests/unit).
"""
