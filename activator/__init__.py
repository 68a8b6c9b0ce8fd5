"""activator: on-demand socket activation of containers restored from CRIU checkpoints.

How the pieces fit (I/O lives at the edges, the middle is plain logic). Reading order, runtime path first:

    config      YAML -> frozen, validated ServiceConfig objects; every key declared once (parser, errors, JSON Schema)
    yamlload    the strict YAML loader config uses (no duplicate keys, no alias bombs, no base-60 numbers)
    compose     pure: a docker-compose.yml (x-activator blocks, ${VAR} interpolation) -> the services document;
                every Compose service key applied, refused or ignored with a note
    units       pure: durations and sizes as people write them (config and compose parse with it)
    server      the one lifecycle owner: startup, main loop, reload, drain, shutdown; checkpoint retries
    reload      pure: what a reload changes (added, removed, changed, unchanged; settings that need a restart)
    listeners   listening sockets: handed in (LISTEN_FDS, a caller's) matched by address or name, the rest bound
    proxy       a client connection: held until it is real, then waking, then spliced (header, held bytes, EOF);
                a prober's request answered, a browser's waiting page
    udp         a UDP service's datagram socket and its flows: held while it wakes, relayed, ended when quiet
    probes      pure: which held request is a health check, and the answer (recorded, or an instance's), rebuilt
    httpwait    pure: which held request is a browser's page load, and the page that reloads itself
    liveview    pure: `activator top`'s frame from two status answers
    schedule    pure: keep_alive_schedule windows in local time
    service     one service: admission (Lease), scale-out, waiting, backoff, idle reap
    capacity    pure: which instance takes a connection, how many more to start, backoff, the descriptor budget
    proxy_protocol  pure: PROXY protocol v1/v2 headers
    instance    one instance, and bringing it up (restore or cold start); the prepared slots of a service
    checkpoint  the checkpoint store: the record (what it was made from, what it holds) and pycriu readers
    sandbox     one instance's resources (netns, mount, bundle, cgroups, CRIU or runc) made and released together
    criurestore a restore as one RPC to an idle `criu swrk` waiting in a prepared slot
    criulog     CRIU's own Error lines, for one-line messages
    extmounts   the container's tmpfs mounts, made by a slot instead of rebuilt by CRIU
    volumes     volumes: host paths and named volumes bound into template and instances
    criucache   CRIU's kernel-feature cache kept valid
    procs       helpers (runc, CRIU) spawned by vfork from a thread pool, killed with their session
    ksm         memory sharing between a service's instances (PR_SET_MEMORY_MERGE, ksmd pacing)
    network     the instance network: bridge, veths, nftables steering (the kernel path), limits, accounting
    nft         libnftables in process
    spec        pure: the OCI runtime spec (Docker's default sandbox)
    seccomp     Docker's default seccomp profile (vendored in profiles/) -> the spec's filter
    netns       network namespaces (unshare + bind mount, lo up with pyroute2) and sockets opened inside them
    rootfs      overlay mounts: image layer + checkpoint diff + a fresh upper per instance
    runc        the runc CLI (run, checkpoint, restore, delete) and what a killed runc leaves in its root
    cgroups     an instance's cgroups, emptied and removed even when runc cannot
    readiness   "is the app listening?" without opening probe connections
    builder     making checkpoints: template, readiness, dump (only `run`'s startup and `checkpoint` need it)
    images      the image source (Docker, or Podman's Docker-compatible API): image config and an unpacked rootfs
    statedir    state_dir's whole layout, its lock, and who may read it (root only)
    host        preflight + lock + crash leftovers, shared by `run`, `checkpoint` and `cleanup`
    preflight   host checks (root, runc, CRIU, pycriu) and the descriptor limit
    metrics     Prometheus metrics
    systemd     sd_notify (READY, WATCHDOG, STOPPING), LISTEN_FDS socket handoff
    control     the root-only control socket `activator status` talks to
    tasks       owned, named tasks (spawn)
    errors      one-line operator errors
    cli         `activator run|validate|reload|status|top|wake|stop|start|scale|logs|inspect|checkpoint|cleanup|schema`
"""

__version__ = "0.4.0"
