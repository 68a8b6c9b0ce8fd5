/* Test app for the busybox image: a TCP echo server, one forked child per connection.
 * It honours half-close (echoes until the client's FIN, then sends its own), which busybox's nc -e does not
 * do reliably under concurrent connections.  Usage: echo-server PORT */
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: echo-server PORT\n"); return 2; }
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    int s = socket(AF_INET6, SOCK_STREAM, 0), on = 1, off = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[1])), .sin6_addr = in6addr_any};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) { perror("echo-server"); return 1; }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (fork() == 0) {
            close(s);
            char buf[65536];
            ssize_t n;
            while ((n = read(c, buf, sizeof buf)) > 0)
                for (ssize_t off2 = 0, w; off2 < n; off2 += w)
                    if ((w = write(c, buf + off2, n - off2)) <= 0) _exit(1);
            shutdown(c, SHUT_WR);
            _exit(0);
        }
        close(c);
    }
}
