"""activator: on-demand socket activation of containers restored from CRIU checkpoints.

How the pieces fit (I/O lives at the edges, the middle is plain logic):

    config      YAML -> frozen, validated ServiceConfig objects (no I/O beyond reading the file)
    images      the Docker engine as an image source: image config and an unpacked root filesystem
    spec        pure: OCI runtime spec for one instance
    netns       network namespaces (unshare + bind mount, lo up with pyroute2) and sockets opened inside them
    rootfs      overlay mounts: image layer + checkpoint diff + a fresh upper per instance
    runc        the runc CLI (run, checkpoint, restore, delete) and what a killed runc leaves in its root
    cgroups     an instance's cgroups, emptied and removed even when runc cannot
    sandbox     one instance's resources (netns, mount, bundle, runc container) made and released together
    checkpoint  the checkpoint store: build, fingerprint, inspect with pycriu
    readiness   "is the app listening?" without opening probe connections
    capacity    pure: which instance takes a connection, how many more to start, failure backoff
    instance    one instance, and bringing it up: restore (or cold start) until its app listens
    service     per-service lifecycle: restores and scale-out, admission control, backoff, idle reap
    proxy       splice between a client and an instance, with half-close; max_connections; PROXY header
    proxy_protocol  pure: PROXY protocol v1/v2 headers
    metrics     Prometheus metrics
    systemd     sd_notify (READY, WATCHDOG, STOPPING), LISTEN_FDS socket handoff
    control     the root-only control socket `activator status` talks to
    server      the one lifecycle owner: startup, main loop, drain, shutdown
    cli         `activator run|validate|status|inspect|checkpoint|cleanup`
"""

__version__ = "0.2.0"
