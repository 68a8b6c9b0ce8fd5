"""The long-running process: the lifecycle owner (server.py), each service's pool of instances and its
admission (service.py), the client connection (proxy.py), listeners, the control socket, metrics and their
endpoint, systemd integration.

May import every other package; nothing but the CLI imports it.
"""
