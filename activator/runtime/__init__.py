"""One container's mechanics: the OCI spec and its seccomp filter, the root filesystem and mounts, volumes,
cgroups, runc and the direct CRIU RPC restore, helper processes, readiness from /proc, KSM, the state directory's
layout, host preflight checks, kept app output.

Imports activator.config, activator.core, activator.net (an instance is plugged into the bridge) and
activator.errors/tasks; never activator.checkpoints or activator.daemon.
"""
