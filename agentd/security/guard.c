/* agentd's instance guard: preloaded (LD_PRELOAD) into every process agentd launches for an instance in a
 * secure cluster, and so into all their children, it closes each accepted TCP connection whose peer is not
 * one of the instance's hosts. torch.distributed's TCPStore, NCCL, gloo, ZMQ and Ray listen on every
 * interface with no authentication; this makes their listening sockets take only the parts of the instance
 * (docs/security.md, "Only the parts of an instance reach its processes").
 *
 * Policy, read once at load from the environment (agentd/runtime/guard.py writes it):
 *   AGENTD_GUARD_ALLOW       comma-separated addresses or CIDR blocks, IPv4 or IPv6, whose connections pass;
 *   AGENTD_GUARD_OPEN_PORTS  comma-separated local ports anyone may reach (the serving endpoint).
 * A missing or malformed policy fails closed: every TCP connection is refused, and load says why once.
 * AF_UNIX and other families pass untouched.
 *
 * accept/accept4 call the real function, then check the new connection's peer; a refused one is closed and
 * the real function is called again, so a blocking listener waits for the next connection and a
 * non-blocking one sees EAGAIN, as the kernel would answer with nothing queued. Each refusal writes a line
 * to stderr (the model server's log), at most LOG_BURST a window of LOG_WINDOW seconds.
 *
 * Limits: a statically linked or setuid program ignores LD_PRELOAD; io_uring and raw syscalls bypass it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_RULES 1024
#define MAX_PORTS 64
#define LOG_WINDOW 10
#define LOG_BURST 20

struct rule {
    int family;            /* AF_INET or AF_INET6 */
    unsigned char addr[16];
    int prefix;            /* bits */
};

static struct rule rules[MAX_RULES];
static int n_rules;
static unsigned short open_ports[MAX_PORTS];
static int n_open;
static int policy_ok; /* 0: refuse every TCP connection (missing or malformed policy) */

static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);

static long log_window_start;
static int log_count;
static long log_dropped;

static void say(const char *line) {
    size_t n = strlen(line);
    while (n > 0) {
        ssize_t w = write(2, line, n);
        if (w <= 0)
            return;
        line += w;
        n -= (size_t)w;
    }
}

static int parse_rule(const char *item, struct rule *r) {
    char text[INET6_ADDRSTRLEN + 8];
    size_t len = strlen(item);
    if (len == 0 || len >= sizeof(text))
        return -1;
    memcpy(text, item, len + 1);
    char *slash = strchr(text, '/');
    long prefix = -1;
    if (slash) {
        char *end;
        *slash = '\0';
        errno = 0;
        prefix = strtol(slash + 1, &end, 10);
        if (errno || end == slash + 1 || *end != '\0' || prefix < 0)
            return -1;
    }
    if (inet_pton(AF_INET, text, r->addr) == 1) {
        r->family = AF_INET;
        r->prefix = prefix < 0 ? 32 : (int)prefix;
        return prefix > 32 ? -1 : 0;
    }
    if (inet_pton(AF_INET6, text, r->addr) == 1) {
        r->family = AF_INET6;
        r->prefix = prefix < 0 ? 128 : (int)prefix;
        if (prefix > 128)
            return -1;
        if (IN6_IS_ADDR_V4MAPPED((struct in6_addr *)r->addr) && r->prefix >= 96) { /* peers are normalised so */
            r->family = AF_INET;
            memmove(r->addr, r->addr + 12, 4);
            r->prefix -= 96;
        }
        return 0;
    }
    return -1;
}

static int parse_port(const char *item, unsigned short *port) {
    char *end;
    errno = 0;
    long v = strtol(item, &end, 10);
    if (errno || end == item || *end != '\0' || v < 1 || v > 65535)
        return -1;
    *port = (unsigned short)v;
    return 0;
}

/* Splits a comma-separated list in place and hands each item to `take`; -1 if an item is malformed. */
static int each_item(char *list, int (*take)(const char *, void *), void *arg) {
    if (*list == '\0')
        return 0;
    for (char *item = list;;) {
        char *comma = strchr(item, ',');
        if (comma)
            *comma = '\0';
        if (take(item, arg) != 0)
            return -1;
        if (!comma)
            return 0;
        item = comma + 1;
    }
}

static int take_rule(const char *item, void *arg) {
    (void)arg;
    return n_rules < MAX_RULES ? parse_rule(item, &rules[n_rules++]) : -1;
}

static int take_port(const char *item, void *arg) {
    (void)arg;
    return n_open < MAX_PORTS ? parse_port(item, &open_ports[n_open++]) : -1;
}

static const char *load_policy(void) {
    const char *allow = getenv("AGENTD_GUARD_ALLOW");
    const char *open = getenv("AGENTD_GUARD_OPEN_PORTS");
    static char buf[65536];
    if (!allow)
        return "AGENTD_GUARD_ALLOW is not set";
    if (strlen(allow) >= sizeof(buf))
        return "AGENTD_GUARD_ALLOW is too long";
    strcpy(buf, allow);
    if (each_item(buf, take_rule, NULL) != 0)
        return "AGENTD_GUARD_ALLOW is malformed (want addresses or CIDR blocks, comma-separated)";
    if (open) {
        if (strlen(open) >= sizeof(buf))
            return "AGENTD_GUARD_OPEN_PORTS is too long";
        strcpy(buf, open);
        if (each_item(buf, take_port, NULL) != 0)
            return "AGENTD_GUARD_OPEN_PORTS is malformed (want ports 1-65535, comma-separated)";
    }
    return NULL;
}

__attribute__((constructor)) static void guard_init(void) {
    int saved = errno;
    real_accept = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    real_accept4 = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    const char *why = load_policy();
    if (why) {
        char line[256];
        n_rules = n_open = 0;
        snprintf(line, sizeof(line), "agentd guard: %s: refusing every TCP connection (pid %d)\n", why,
                 (int)getpid());
        say(line);
    } else {
        policy_ok = 1;
    }
    errno = saved;
}

static int matches(const struct rule *r, int family, const unsigned char *addr) {
    if (r->family != family)
        return 0;
    int full = r->prefix / 8, rest = r->prefix % 8;
    if (memcmp(r->addr, addr, (size_t)full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (r->addr[full] & mask) == (addr[full] & mask);
}

static void note_refusal(const char *peer, int peer_port, int local_port, const char *why) {
    long now = (long)time(NULL);
    char line[320];
    long window = __atomic_load_n(&log_window_start, __ATOMIC_RELAXED);
    if (now - window >= LOG_WINDOW &&
        __atomic_compare_exchange_n(&log_window_start, &window, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        long dropped = __atomic_exchange_n(&log_dropped, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&log_count, 0, __ATOMIC_RELAXED);
        if (dropped > 0) {
            snprintf(line, sizeof(line), "agentd guard: %ld more refusals were not logged\n", dropped);
            say(line);
        }
    }
    if (__atomic_add_fetch(&log_count, 1, __ATOMIC_RELAXED) > LOG_BURST) {
        __atomic_add_fetch(&log_dropped, 1, __ATOMIC_RELAXED);
        return;
    }
    snprintf(line, sizeof(line), "agentd guard: refused %s%s%s:%d on port %d (%s)\n",
             strchr(peer, ':') ? "[" : "", peer, strchr(peer, ':') ? "]" : "", peer_port, local_port, why);
    say(line);
}

/* 1 when the accepted connection `fd` may stay open. */
static int allowed(int fd) {
    struct sockaddr_storage peer, local;
    socklen_t plen = sizeof(peer), llen = sizeof(local);
    if (getsockname(fd, (struct sockaddr *)&local, &llen) != 0)
        return 0;
    int family = local.ss_family;
    if (family != AF_INET && family != AF_INET6)
        return 1;
    int local_port = ntohs(family == AF_INET ? ((struct sockaddr_in *)&local)->sin_port
                                             : ((struct sockaddr_in6 *)&local)->sin6_port);
    char text[INET6_ADDRSTRLEN] = "?";
    int peer_port = 0;
    if (getpeername(fd, (struct sockaddr *)&peer, &plen) != 0) {
        note_refusal(text, 0, local_port, "peer unknown");
        return 0; /* reset before we looked: nothing to lose */
    }
    unsigned char addr[16];
    if (peer.ss_family == AF_INET6) {
        struct sockaddr_in6 *p6 = (struct sockaddr_in6 *)&peer;
        peer_port = ntohs(p6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&p6->sin6_addr)) { /* ::ffff:a.b.c.d is a.b.c.d */
            family = AF_INET;
            memcpy(addr, &p6->sin6_addr.s6_addr[12], 4);
        } else {
            family = AF_INET6;
            memcpy(addr, &p6->sin6_addr, 16);
        }
    } else {
        struct sockaddr_in *p4 = (struct sockaddr_in *)&peer;
        peer_port = ntohs(p4->sin_port);
        family = AF_INET;
        memcpy(addr, &p4->sin_addr, 4);
    }
    inet_ntop(family, addr, text, sizeof(text));
    if (!policy_ok) {
        note_refusal(text, peer_port, local_port, "no valid policy");
        return 0;
    }
    for (int i = 0; i < n_open; i++)
        if (open_ports[i] == local_port)
            return 1;
    for (int i = 0; i < n_rules; i++)
        if (matches(&rules[i], family, addr))
            return 1;
    note_refusal(text, peer_port, local_port, "not a host of this instance");
    return 0;
}

static int guarded(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags, int four) {
    socklen_t room = addrlen ? *addrlen : 0; /* the kernel overwrites it: each retry gets the caller's size */
    for (;;) {
        int conn;
        if (addrlen)
            *addrlen = room;
        if (four) {
            if (!real_accept4) {
                errno = ENOSYS;
                return -1;
            }
            conn = real_accept4(fd, addr, addrlen, flags);
        } else {
            if (!real_accept) {
                errno = ENOSYS;
                return -1;
            }
            conn = real_accept(fd, addr, addrlen);
        }
        if (conn < 0)
            return conn;
        int saved = errno;
        if (allowed(conn)) {
            errno = saved;
            return conn;
        }
        close(conn);
        errno = saved;
    }
}

int accept(int fd, struct sockaddr *addr, socklen_t *addrlen) { return guarded(fd, addr, addrlen, 0, 0); }

int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags) {
    return guarded(fd, addr, addrlen, flags, 1);
}
