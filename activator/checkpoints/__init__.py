"""From an image to running instances: the Docker engine as image source, the checkpoint store (and reading a
dump with pycriu), the builder that runs a template and dumps it, the launcher that restores (or cold-starts)
instances from a checkpoint, and the host as every command needs it (checked, locked, leftovers removed).

Imports activator.runtime, activator.net, activator.config, activator.core, activator.errors/tasks; never
activator.daemon (the one-shot CLI commands use this package without the daemon).
"""
