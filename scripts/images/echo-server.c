/* Test app for the busybox image: a TCP echo server, one forked child per connection.
 * It honours half-close (echoes until the client's FIN, then sends its own), which busybox's nc -e does not
 * do reliably under concurrent connections.
 *
 * Usage: echo-server PORT [AFTER_RESTORE_MS]
 * With AFTER_RESTORE_MS the server notices when it has been restored into a new network namespace (its
 * listener's SO_NETNS_COOKIE changes; namespace inode numbers are reused, cookies never are), closes its
 * listener, and listens again AFTER_RESTORE_MS later (never if -1): an app that listens late, or never, after
 * a restore.
 * With SHUTDOWN_ON_RESTORE also set, it shuts the listener down (shutdown(2)) before closing it: a hostile
 * app handed its service's own listening socket (handoff) stopping it for everyone who holds it.
 * With BANNER set in the environment it writes that line first on every connection (a server-speaks-first
 * protocol, like MySQL or SMTP). */
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int listener(int port) {
    int s = socket(AF_INET6, SOCK_STREAM, 0), on = 1, off = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) { perror("echo-server"); exit(1); }
    return s;
}

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

static unsigned long long netns(int s) {
    unsigned long long cookie = 0;
    socklen_t len = sizeof cookie;
    getsockopt(s, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len);
    return cookie;
}

static void serve(int s, int c) {
    close(s);
    const char *banner = getenv("BANNER");
    if (banner && (write(c, banner, strlen(banner)) < 0 || write(c, "\n", 1) < 0)) _exit(1);
    char buf[65536];
    ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0)
        for (ssize_t off = 0, w; off < n; off += w)
            if ((w = write(c, buf + off, n - off)) <= 0) _exit(1);
    shutdown(c, SHUT_WR);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) { fprintf(stderr, "usage: echo-server PORT [AFTER_RESTORE_MS]\n"); return 2; }
    int port = atoi(argv[1]), watch = argc == 3, after = watch ? atoi(argv[2]) : 0;
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    int s = listener(port);
    unsigned long long ns = netns(s);
    for (;;) {
        if (watch) {
            /* A short sleep, not a poll(): a task restored inside poll() may sleep on until the next connection,
             * which would let that connection in before we notice the restore. */
            if (netns(s) != ns) {
                fprintf(stderr, "echo-server: restored; listening again in %d ms\n", after);
                if (getenv("SHUTDOWN_ON_RESTORE")) shutdown(s, SHUT_RDWR);
                close(s);
                if (after < 0) for (;;) pause();
                struct timespec t = {after / 1000, (after % 1000) * 1000000L};
                nanosleep(&t, NULL);
                s = listener(port);
                ns = netns(s);
            }
            struct pollfd p = {.fd = s, .events = POLLIN};
            if (poll(&p, 1, 0) == 0) {
                struct timespec t = {0, 1000000L};
                nanosleep(&t, NULL);
                continue;
            }
        }
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (fork() == 0) serve(s, c);
        close(c);
    }
}
