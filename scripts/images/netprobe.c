/* Test app for the busybox image: what an app with a network does, one line command per request.
 *
 * Usage: netprobe PORT          (listens on [::]:PORT, dual-stack; a thread per client connection)
 * With POOL=HOST:PORT in the environment it first connects there and keeps that connection open, before it
 * listens (like a database pool opened at start-up), and reconnects when it finds it broken.
 *
 * Commands, one per line, each answered with one line:
 *   peer                      -> "peer ADDR PORT": the client's address as the app sees it
 *   pool TEXT                 -> "pool REPLY" over the kept connection, or "pool-reconnected REPLY" when that
 *                                connection had failed (a restored instance finds it closed) and was made again
 *   dial HOST PORT TEXT       -> "dial REPLY" from a fresh connection to HOST:PORT, or "dial-error WHY"
 *   resolve NAME              -> "resolve ADDR" through getaddrinfo (so /etc/hosts), or "resolve-error WHY"
 *   anything else             -> echoed back
 * A line server at the other end answers each line it gets with one line. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static int pool_fd = -1;
static char pool_host[256], pool_port[16];

static int dial(const char *host, const char *port, char *why, size_t whylen) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) { snprintf(why, whylen, "%s", gai_strerror(rc)); return -1; }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, 0);
        struct timeval tv = {2, 0};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        snprintf(why, whylen, "%s", strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

/* Send one line, read one line back. 0 on success. */
static int ask(int fd, const char *text, char *reply, size_t len) {
    char out[1100];
    int n = snprintf(out, sizeof out, "%s\n", text);
    if (send(fd, out, n, MSG_NOSIGNAL) != n) return -1;
    size_t got = 0;
    while (got + 1 < len) {
        ssize_t r = recv(fd, reply + got, 1, 0);
        if (r <= 0) return -1;
        if (reply[got] == '\n') break;
        got++;
    }
    reply[got] = 0;
    return 0;
}

static void resolve(const char *name, char *out, size_t len) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    if (rc) { snprintf(out, len, "resolve-error %s\n", gai_strerror(rc)); return; }
    char ip[INET6_ADDRSTRLEN] = "?";
    if (res->ai_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)res->ai_addr)->sin_addr, ip, sizeof ip);
    else
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)res->ai_addr)->sin6_addr, ip, sizeof ip);
    freeaddrinfo(res);
    snprintf(out, len, "resolve %s\n", ip);
}

static void command(int c, char *line, const struct sockaddr_in6 *peer) {
    char out[1200], reply[1024], why[256];
    if (!strcmp(line, "peer")) {
        char ip[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &peer->sin6_addr, ip, sizeof ip);
        const char *shown = strncmp(ip, "::ffff:", 7) ? ip : ip + 7;
        snprintf(out, sizeof out, "peer %s %d\n", shown, ntohs(peer->sin6_port));
    } else if (!strncmp(line, "pool ", 5)) {
        pthread_mutex_lock(&pool_lock);
        const char *tag = "pool";
        if (pool_fd < 0 || ask(pool_fd, line + 5, reply, sizeof reply)) {
            if (pool_fd >= 0) close(pool_fd);
            tag = "pool-reconnected";
            pool_fd = pool_host[0] ? dial(pool_host, pool_port, why, sizeof why) : -1;
            if (pool_fd < 0 || ask(pool_fd, line + 5, reply, sizeof reply))
                snprintf(reply, sizeof reply, "unreachable");
        }
        pthread_mutex_unlock(&pool_lock);
        snprintf(out, sizeof out, "%s %s\n", tag, reply);
    } else if (!strncmp(line, "dial ", 5)) {
        char host[256], port[16];
        int used = 0;
        if (sscanf(line + 5, "%255s %15s %n", host, port, &used) < 2) {
            snprintf(out, sizeof out, "dial-error usage\n");
        } else {
            int fd = dial(host, port, why, sizeof why);
            if (fd < 0) snprintf(out, sizeof out, "dial-error %s\n", why);
            else {
                if (ask(fd, line + 5 + used, reply, sizeof reply)) snprintf(out, sizeof out, "dial-error no reply\n");
                else snprintf(out, sizeof out, "dial %s\n", reply);
                close(fd);
            }
        }
    } else if (!strncmp(line, "resolve ", 8)) {
        resolve(line + 8, out, sizeof out);
    } else {
        snprintf(out, sizeof out, "%s\n", line);
    }
    send(c, out, strlen(out), MSG_NOSIGNAL);
}

struct client { int fd; struct sockaddr_in6 peer; };

static void *serve(void *arg) {
    struct client *cl = arg;
    char line[1024];
    size_t n = 0;
    for (;;) {
        char ch;
        ssize_t r = recv(cl->fd, &ch, 1, 0);
        if (r <= 0) break;
        if (ch == '\n') { line[n] = 0; command(cl->fd, line, &cl->peer); n = 0; }
        else if (n + 1 < sizeof line) line[n++] = ch;
    }
    close(cl->fd);
    free(cl);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: netprobe PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    const char *pool = getenv("POOL");
    if (pool) {
        const char *colon = strrchr(pool, ':');
        if (!colon) { fprintf(stderr, "netprobe: POOL is HOST:PORT\n"); return 2; }
        snprintf(pool_host, sizeof pool_host, "%.*s", (int)(colon - pool), pool);
        snprintf(pool_port, sizeof pool_port, "%s", colon + 1);
        char why[256];
        for (int i = 0; i < 200 && (pool_fd = dial(pool_host, pool_port, why, sizeof why)) < 0; i++) usleep(50000);
        if (pool_fd < 0) { fprintf(stderr, "netprobe: cannot reach the pool at %s: %s\n", pool, why); return 1; }
        fprintf(stderr, "netprobe: pool connected to %s\n", pool);
    }
    int s = socket(AF_INET6, SOCK_STREAM, 0), on = 1, off = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[1])), .sin6_addr = in6addr_any};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) { perror("netprobe"); return 1; }
    for (;;) {
        struct client *cl = malloc(sizeof *cl);
        socklen_t len = sizeof cl->peer;
        cl->fd = accept(s, (struct sockaddr *)&cl->peer, &len);
        if (cl->fd < 0) { free(cl); continue; }
        pthread_t t;
        if (pthread_create(&t, NULL, serve, cl)) { close(cl->fd); free(cl); continue; }
        pthread_detach(t);
    }
}
