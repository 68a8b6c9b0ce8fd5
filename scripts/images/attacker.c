/* Test app for the busybox image: an instance that attacks its neighbours (tests/engine/test_tenant_isolation.py).
 *
 * Usage: attacker PORT      (listens on [::]:PORT, dual-stack; a thread per client, one line command each)
 *   caps                                   -> "caps CAPEFF" (hex, from /proc/self/status)
 *   raw DSTMAC SRCMAC SRCIP DSTIP PORT TEXT -> sends an Ethernet/IPv4/UDP frame on eth0 with whatever addresses it
 *                                             is told (needs CAP_NET_RAW): "raw sent", or "raw-error WHY"
 *   arp SRCMAC SENDERIP TARGETIP           -> a gratuitous ARP reply claiming SENDERIP is at SRCMAC
 *   dial HOST PORT TEXT                     -> TCP (IPv6 link-local as fe80::X%eth0): "dial REPLY" or "dial-error WHY"
 *   listen-udp PORT                         -> receives UDP on PORT from now on: "listening"
 *   heard                                   -> "heard TEXT" (the last datagram) or "heard-nothing"
 * With `handoff: true` its listener is the service's own socket, shared with the activator (handoff.py); these act
 * on it (tests/engine/test_handoff_attacks.py), and those that give it up (close, park) listen on PORT in the
 * instance instead:
 *   filter                                 -> attaches a drop-all socket filter to it: "filtered" or "filter-error WHY"
 *   lockfilter                             -> the same, then SO_LOCK_FILTER: "locked detach=WHY" (detaching refused)
 *   backlog N                              -> listen(N) on it: "backlog N"
 *   linger N                               -> SO_LINGER {on, N s} on it, which every connection accepted from it
 *                                             inherits (close() then waits for unsent data): "linger N"
 *   timestamping                           -> SO_TIMESTAMPING with TX timestamps on it, inherited the same way (each
 *                                             write queues on the error queue): "timestamping FLAGS"
 *   bind-device NAME                       -> SO_BINDTODEVICE on it (a device of the host's network namespace, where
 *                                             the socket lives): "bound NAME" or "bind-device-error WHY"
 *   md5 ADDR                               -> a TCP-MD5 key (RFC 2385) for peer ADDR on it: a SYN from ADDR without
 *                                             the signature is dropped, for every holder: "keyed ADDR" or
 *                                             "md5-error WHY"
 *   shutdown                               -> shutdown(2) (stopped for every holder), still accepted from: "shut"
 *   close                                  -> close(2): "closed"
 *   park                                   -> sends it to itself in an SCM_RIGHTS message and closes it, so no
 *                                             descriptor table shows it: "parked"
 *   unpark                                 -> takes it back, clears O_NONBLOCK (the flags are every holder's) and
 *                                             accepts from it again, racing the activator: "unparked nonblock=0|1"
 *                                             (whether it was set while parked)
 *   anything else                           -> echoed back */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/net_tstamp.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <netpacket/packet.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static char heard[512] = "";
static volatile int s = -1;  /* the listener main() accepts from: the service's socket, until a command gives it up */
static int port = 9000, parking[2] = {-1, -1}, unparked = -1;

#ifndef SO_LOCK_FILTER
#define SO_LOCK_FILTER 44
#endif

static int own_listener(void) {
    int l = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 addr = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    if (bind(l, (struct sockaddr *)&addr, sizeof addr) || listen(l, 64)) { close(l); return -1; }
    return l;
}

static void *client(void *arg);

static void *accept_loop(void *arg) {
    int l = (int)(long)arg;
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) { usleep(1000); continue; }
        pthread_t t;
        if (pthread_create(&t, NULL, client, (void *)(long)c)) close(c);
        else pthread_detach(t);
    }
    return NULL;
}

/* Listen in the instance from now on, served by a thread of its own (main() may still be inside accept() on the
 * old one); the socket main() was accepting from is returned. */
static int give_up_listener(void) {
    int old = s, l = own_listener();
    pthread_t t;
    if (l >= 0) {
        s = l;
        if (pthread_create(&t, NULL, accept_loop, (void *)(long)l) == 0) pthread_detach(t);
    }
    return old;
}

static void handed(char **a, int n, char *out, size_t len) {
    if (!strcmp(a[0], "filter") || !strcmp(a[0], "lockfilter")) {
        struct sock_filter drop = BPF_STMT(BPF_RET | BPF_K, 0);
        struct sock_fprog prog = {.len = 1, .filter = &drop};
        int one = 1;
        if (setsockopt(s, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog)) {
            snprintf(out, len, "filter-error %s\n", strerror(errno));
        } else if (a[0][0] == 'f') {
            snprintf(out, len, "filtered\n");
        } else if (setsockopt(s, SOL_SOCKET, SO_LOCK_FILTER, &one, sizeof one)) {
            snprintf(out, len, "filter-error lock %s\n", strerror(errno));
        } else {
            int r = setsockopt(s, SOL_SOCKET, SO_DETACH_FILTER, &one, sizeof one);
            snprintf(out, len, "locked detach=%s\n", r ? strerror(errno) : "done");
        }
    } else if (!strcmp(a[0], "linger") && n == 2) {
        struct linger l = {.l_onoff = 1, .l_linger = atoi(a[1])};
        int r = setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        snprintf(out, len, r ? "linger-error %s\n" : "linger %s\n", r ? strerror(errno) : a[1]);
    } else if (!strcmp(a[0], "timestamping")) {
        int flags = SOF_TIMESTAMPING_SOFTWARE | SOF_TIMESTAMPING_TX_SCHED | SOF_TIMESTAMPING_TX_ACK |
                    SOF_TIMESTAMPING_OPT_TSONLY;
        int r = setsockopt(s, SOL_SOCKET, SO_TIMESTAMPING, &flags, sizeof flags);
        if (r) snprintf(out, len, "timestamping-error %s\n", strerror(errno));
        else snprintf(out, len, "timestamping %d\n", flags);
    } else if (!strcmp(a[0], "bind-device") && n == 2) {
        int r = setsockopt(s, SOL_SOCKET, SO_BINDTODEVICE, a[1], strlen(a[1]));
        snprintf(out, len, r ? "bind-device-error %s\n" : "bound %s\n", r ? strerror(errno) : a[1]);
    } else if (!strcmp(a[0], "md5") && n == 2) {
        struct tcp_md5sig key = {.tcpm_keylen = 8};
        struct sockaddr_in *v4 = (struct sockaddr_in *)&key.tcpm_addr;
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&key.tcpm_addr;
        memcpy(key.tcpm_key, "hostile!", 8);
        struct sockaddr_storage own;
        socklen_t ownlen = sizeof own;
        getsockname(s, (struct sockaddr *)&own, &ownlen);
        if (own.ss_family == AF_INET && inet_pton(AF_INET, a[1], &v4->sin_addr) == 1) {
            v4->sin_family = AF_INET;
        } else if (own.ss_family == AF_INET6 && inet_pton(AF_INET, a[1], &v6->sin6_addr.s6_addr[12]) == 1) {
            v6->sin6_family = AF_INET6;  /* a dual-stack socket keys an IPv4 peer by its mapped address */
            v6->sin6_addr.s6_addr[10] = v6->sin6_addr.s6_addr[11] = 0xff;
        } else if (inet_pton(AF_INET6, a[1], &v6->sin6_addr) == 1) {
            v6->sin6_family = AF_INET6;
        } else {
            snprintf(out, len, "md5-error bad address\n");
            return;
        }
        int r = setsockopt(s, IPPROTO_TCP, TCP_MD5SIG, &key, sizeof key);
        snprintf(out, len, r ? "md5-error %s\n" : "keyed %s\n", r ? strerror(errno) : a[1]);
    } else if (!strcmp(a[0], "backlog") && n == 2) {
        int r = listen(s, atoi(a[1]));
        snprintf(out, len, r ? "backlog-error %s\n" : "backlog %s\n", r ? strerror(errno) : a[1]);
    } else if (!strcmp(a[0], "shutdown")) {
        int r = shutdown(s, SHUT_RDWR);
        snprintf(out, len, r ? "shut-error %s\n" : "shut\n", strerror(errno));
    } else if (!strcmp(a[0], "close")) {
        close(give_up_listener());
        snprintf(out, len, "closed\n");
    } else if (!strcmp(a[0], "park")) {
        char byte = 'p', cbuf[CMSG_SPACE(sizeof(int))] = {0};
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
        if (parking[0] < 0 && socketpair(AF_UNIX, SOCK_DGRAM, 0, parking)) {
            snprintf(out, len, "park-error %s\n", strerror(errno));
            return;
        }
        int old = give_up_listener();
        memcpy(CMSG_DATA(c), &old, sizeof old);
        if (sendmsg(parking[1], &m, 0) != 1) { snprintf(out, len, "park-error %s\n", strerror(errno)); return; }
        close(old);
        snprintf(out, len, "parked\n");
    } else if (!strcmp(a[0], "unpark")) {
        char byte, cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        struct cmsghdr *c;
        if (parking[0] < 0 || recvmsg(parking[0], &m, 0) != 1 || !(c = CMSG_FIRSTHDR(&m))) {
            snprintf(out, len, "unpark-error %s\n", strerror(errno));
            return;
        }
        memcpy(&unparked, CMSG_DATA(c), sizeof unparked);
        int flags = fcntl(unparked, F_GETFL);
        fcntl(unparked, F_SETFL, flags & ~O_NONBLOCK);
        pthread_t t;
        if (pthread_create(&t, NULL, accept_loop, (void *)(long)unparked) == 0) pthread_detach(t);
        snprintf(out, len, "unparked nonblock=%d\n", !!(flags & O_NONBLOCK));
    }
}
static pthread_mutex_t heard_lock = PTHREAD_MUTEX_INITIALIZER;

static int parse_mac(const char *s, unsigned char *m) {
    return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) == 6 ? 0 : -1;
}

static unsigned short csum(const void *data, int len) {
    const unsigned short *p = data;
    unsigned long sum = 0;
    for (; len > 1; len -= 2) sum += *p++;
    if (len) sum += *(const unsigned char *)p;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (unsigned short)~sum;
}

static int send_frame(const unsigned char *frame, int len, char *why, size_t whylen) {
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) { snprintf(why, whylen, "%s", strerror(errno)); return -1; }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = if_nametoindex("eth0"), .sll_halen = 6};
    memcpy(to.sll_addr, frame, 6);
    int rc = 0;
    for (int i = 0; i < 3; i++)
        if (sendto(fd, frame, len, 0, (struct sockaddr *)&to, sizeof to) != len) {
            snprintf(why, whylen, "%s", strerror(errno)); rc = -1; break;
        }
    close(fd);
    return rc;
}

static int raw_udp(char **a, char *why, size_t whylen) {
    unsigned char f[1514] = {0};
    struct ether_header *eh = (void *)f;
    struct iphdr *ip = (void *)(f + sizeof *eh);
    struct udphdr *udp = (void *)((unsigned char *)ip + sizeof *ip);
    size_t n = strlen(a[5]);
    if (n > 1000) n = 1000;
    if (parse_mac(a[0], eh->ether_dhost) || parse_mac(a[1], eh->ether_shost)) {
        snprintf(why, whylen, "bad mac"); return -1;
    }
    eh->ether_type = htons(ETHERTYPE_IP);
    ip->version = 4; ip->ihl = 5; ip->ttl = 64; ip->protocol = IPPROTO_UDP;
    ip->tot_len = htons(sizeof *ip + sizeof *udp + n);
    if (inet_pton(AF_INET, a[2], &ip->saddr) != 1 || inet_pton(AF_INET, a[3], &ip->daddr) != 1) {
        snprintf(why, whylen, "bad address"); return -1;
    }
    ip->check = csum(ip, sizeof *ip);
    udp->source = htons(40000); udp->dest = htons(atoi(a[4])); udp->len = htons(sizeof *udp + n);
    memcpy((unsigned char *)udp + sizeof *udp, a[5], n);  /* UDP checksum 0: none, allowed over IPv4 */
    return send_frame(f, sizeof *eh + sizeof *ip + sizeof *udp + n, why, whylen);
}

static int arp_claim(char **a, char *why, size_t whylen) {
    unsigned char f[42] = {0}, mac[6];
    struct in_addr sender, target;
    if (parse_mac(a[0], mac) || inet_pton(AF_INET, a[1], &sender) != 1 || inet_pton(AF_INET, a[2], &target) != 1) {
        snprintf(why, whylen, "bad arguments"); return -1;
    }
    memset(f, 0xff, 6); memcpy(f + 6, mac, 6); f[12] = 0x08; f[13] = 0x06;  /* broadcast, ARP */
    unsigned char *p = f + 14;
    p[0] = 0; p[1] = 1; p[2] = 8; p[3] = 0; p[4] = 6; p[5] = 4; p[6] = 0; p[7] = 2;  /* Ethernet/IPv4 reply */
    memcpy(p + 8, mac, 6); memcpy(p + 14, &sender, 4); memset(p + 18, 0xff, 6); memcpy(p + 24, &target, 4);
    return send_frame(f, sizeof f, why, whylen);
}

static void *udp_listener(void *arg) {
    int fd = (int)(long)arg;
    char buf[500];
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof buf - 1, 0);
        if (r <= 0) continue;
        buf[r] = 0;
        pthread_mutex_lock(&heard_lock);
        snprintf(heard, sizeof heard, "%s", buf);
        pthread_mutex_unlock(&heard_lock);
    }
    return NULL;
}

static void dial(char *host, char *port, char *text, char *out, size_t len) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) { snprintf(out, len, "dial-error %s\n", gai_strerror(rc)); return; }
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        snprintf(out, len, "dial-error %s\n", strerror(errno));
    } else {
        char line[600], reply[500];
        int n = snprintf(line, sizeof line, "%s\n", text);
        send(fd, line, n, MSG_NOSIGNAL);
        ssize_t r = recv(fd, reply, sizeof reply - 1, 0);
        if (r <= 0) snprintf(out, len, "dial-error no answer\n");
        else { reply[r] = 0; reply[strcspn(reply, "\r\n")] = 0; snprintf(out, len, "dial %s\n", reply); }
    }
    close(fd);
    freeaddrinfo(res);
}

static void command(int c, char *line) {
    char out[1200], why[256] = "", *a[8] = {0};
    int n = 0;
    for (char *tok = strtok(line, " "); tok && n < 8; tok = strtok(NULL, " ")) a[n++] = tok;
    if (n == 0) { snprintf(out, sizeof out, "\n"); }
    else if (!strcmp(a[0], "caps")) {
        FILE *f = fopen("/proc/self/status", "r");
        char l[256], eff[64] = "?";
        while (f && fgets(l, sizeof l, f)) if (sscanf(l, "CapEff: %63s", eff) == 1) break;
        if (f) fclose(f);
        snprintf(out, sizeof out, "caps %s\n", eff);
    } else if (!strcmp(a[0], "raw") && n == 7) {
        snprintf(out, sizeof out, raw_udp(a + 1, why, sizeof why) ? "raw-error %s\n" : "raw sent%s\n", why);
    } else if (!strcmp(a[0], "arp") && n == 4) {
        snprintf(out, sizeof out, arp_claim(a + 1, why, sizeof why) ? "arp-error %s\n" : "arp sent%s\n", why);
    } else if (!strcmp(a[0], "dial") && n == 4) {
        dial(a[1], a[2], a[3], out, sizeof out);
    } else if (!strcmp(a[0], "listen-udp") && n == 2) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(atoi(a[1]))};
        pthread_t t;
        if (bind(fd, (struct sockaddr *)&sin, sizeof sin) == 0 && !pthread_create(&t, NULL, udp_listener, (void *)(long)fd))
            snprintf(out, sizeof out, "listening\n");
        else
            snprintf(out, sizeof out, "listen-error %s\n", strerror(errno));
    } else if (!strcmp(a[0], "filter") || !strcmp(a[0], "lockfilter") || !strcmp(a[0], "backlog") ||
               !strcmp(a[0], "bind-device") || !strcmp(a[0], "md5") || !strcmp(a[0], "linger") ||
               !strcmp(a[0], "timestamping") ||
               !strcmp(a[0], "shutdown") || !strcmp(a[0], "close") || !strcmp(a[0], "park") ||
               !strcmp(a[0], "unpark")) {
        out[0] = 0;
        handed(a, n, out, sizeof out);
        if (!out[0]) snprintf(out, sizeof out, "usage-error\n");
    } else if (!strcmp(a[0], "heard")) {
        pthread_mutex_lock(&heard_lock);
        snprintf(out, sizeof out, heard[0] ? "heard %s\n" : "heard-nothing\n", heard);
        pthread_mutex_unlock(&heard_lock);
    } else {
        snprintf(out, sizeof out, "%s\n", a[0]);
    }
    send(c, out, strlen(out), MSG_NOSIGNAL);
}

static void *client(void *arg) {
    int c = (int)(long)arg;
    char line[1100];
    size_t got = 0;
    for (;;) {
        ssize_t r = recv(c, line + got, 1, 0);
        if (r <= 0) break;
        if (line[got] == '\n') {
            line[got] = 0;
            if (got && line[got - 1] == '\r') line[got - 1] = 0;
            command(c, line);
            got = 0;
        } else if (++got >= sizeof line - 1) break;
    }
    close(c);
    return NULL;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    port = argc > 1 ? atoi(argv[1]) : 9000;
    if ((s = own_listener()) < 0) { perror("listen"); return 1; }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) { usleep(1000); continue; }  /* EINVAL while shut down, until whoever holds it listens again */
        pthread_t t;
        if (pthread_create(&t, NULL, client, (void *)(long)c)) close(c);
        else pthread_detach(t);
    }
}
