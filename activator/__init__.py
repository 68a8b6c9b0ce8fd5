"""activator: on-demand socket activation of containers restored from CRIU checkpoints.

How the pieces fit (I/O lives at the edges, the middle is plain logic):

    config      YAML -> frozen, validated ServiceConfig objects (no I/O beyond reading the file)
    images      the Docker engine as an image source: image config and an unpacked root filesystem
    spec        pure: OCI runtime spec for one instance
    netns       network namespaces (pyroute2) and sockets opened inside them
    rootfs      overlay mounts: image layer + checkpoint diff + a fresh upper per instance
    runc        the runc CLI (run, checkpoint, restore, delete)
    sandbox     one instance's resources (netns, mount, bundle, runc container) made and released together
    checkpoint  the checkpoint store: build, fingerprint, inspect with pycriu
    readiness   "is the app listening?" without opening probe connections
    service     per-service lifecycle: single-flight restore, connection accounting, idle reap
    proxy       splice between a client and an instance, with half-close
    metrics     Prometheus metrics
    server      the one lifecycle owner: startup, main loop, drain, shutdown
    cli         `activator run|validate|checkpoint|cleanup`
"""

__version__ = "0.1.0"
