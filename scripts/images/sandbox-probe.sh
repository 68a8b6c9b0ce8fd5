#!/bin/sh
# CGI for the busybox test image: reports the sandbox as the restored httpd's own children see it.
echo "Content-Type: text/plain"
echo
grep -E '^(Seccomp|NoNewPrivs|CapBnd|CapEff):' /proc/self/status
if unshare -U -r true 2>/dev/null; then echo "unshare-user: allowed"; else echo "unshare-user: denied"; fi
if unshare -m true 2>/dev/null; then echo "unshare-mount: allowed"; else echo "unshare-mount: denied"; fi
echo "uid: $(id -u)"
# ?PATH: may this process (root in the instance, as the app) read PATH?
if [ -n "$QUERY_STRING" ]; then
    if head -c 64 "$QUERY_STRING" >/dev/null 2>&1; then echo "read: $(head -c 64 "$QUERY_STRING")"; else echo "read: denied"; fi
fi
