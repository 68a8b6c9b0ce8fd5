"""The host's network for instances: the bridge and its addresses, network namespaces, the nftables tables that
steer clients to instances in the kernel and keep tenants apart, the iptables holes in Docker's firewall, and
conntrack accounting by mark.

Blocking (netlink, libnftables, iptables): callers run it in worker threads. Imports activator.config,
activator.core and activator.errors; never the runtime, checkpoints or daemon packages.
"""
