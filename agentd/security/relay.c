/* The mTLS tunnel's relay in C: the same two halves as agentd/security/tunnel.py, without a Python wake-up
 * per message (docs/security.md, "Helpers behind a tunnel"; issue 14).
 *
 *   relay [-m agentd.security.tunnel] exit  --listen HOST:PORT --to HOST:PORT --tls-dir DIR [--allow NODE]...
 *   relay [-m agentd.security.tunnel] entry --listen HOST:PORT --to HOST:PORT --tls-dir DIR
 *
 * tunnel.py execs it as `python -m agentd.security.tunnel SIDE ...`, argv[0] the Python it ran under: so the
 * process keeps the command line agentd launched (the supervisor matches it when it adopts a stray), and
 * /proc/PID/exe (ps's comm) names this binary.
 *
 * exit: TLS 1.3 server on --listen; the client must present a certificate from DIR/ca.crt with the role URI
 * agentd://role/node and, when --allow names hosts, one of those common names; then plain TCP to --to.
 * entry: plain TCP on --listen; each connection goes over TLS 1.3 to --to, presenting DIR/node.crt and
 * verifying the exit against DIR/ca.crt by the shared node name (node.agentd.invalid).
 *
 * One thread per connection: a blocking handshake within CONNECT_TIMEOUT, then a poll loop that copies both
 * ways on non-blocking sockets with TCP_NODELAY. Any end of either side (EOF, error, TLS alert) ends the
 * connection, as in tunnel.py: request/response protocols such as ggml RPC never half-close.
 *
 * Exit codes: 0 after SIGTERM/SIGINT, 1 when it cannot set up (files, listening socket), 2 for bad arguments.
 *
 * No OpenSSL headers are needed (a host may have libssl.so.3 without libssl-dev): the few functions used are
 * declared below with their OpenSSL 3 signatures, and the build links libssl.so.3/libcrypto.so.3 by name
 * (agentd/security/relay.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ---- the OpenSSL 3 API used (opaque types, constants from its public headers) ---- */
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct x509_st X509;
typedef struct X509_name_st X509_NAME;
typedef struct X509_name_entry_st X509_NAME_ENTRY;
typedef struct asn1_string_st ASN1_STRING;
typedef struct stack_st OPENSSL_STACK;
typedef struct { int type; ASN1_STRING *value; } GENERAL_NAME; /* d is a union of pointers */

extern const SSL_METHOD *TLS_server_method(void);
extern const SSL_METHOD *TLS_client_method(void);
extern SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
extern long SSL_CTX_ctrl(SSL_CTX *, int, long, void *);
extern uint64_t SSL_CTX_set_options(SSL_CTX *, uint64_t);
extern int SSL_CTX_use_certificate_chain_file(SSL_CTX *, const char *);
extern int SSL_CTX_use_PrivateKey_file(SSL_CTX *, const char *, int);
extern int SSL_CTX_check_private_key(const SSL_CTX *);
extern int SSL_CTX_load_verify_locations(SSL_CTX *, const char *, const char *);
extern void SSL_CTX_set_verify(SSL_CTX *, int, void *);
extern int SSL_CTX_set_num_tickets(SSL_CTX *, size_t);
extern SSL *SSL_new(SSL_CTX *);
extern void SSL_free(SSL *);
extern int SSL_set_fd(SSL *, int);
extern long SSL_ctrl(SSL *, int, long, void *);
extern int SSL_set1_host(SSL *, const char *);
extern void SSL_set_hostflags(SSL *, unsigned int);
extern int SSL_accept(SSL *);
extern int SSL_connect(SSL *);
extern int SSL_read(SSL *, void *, int);
extern int SSL_has_pending(const SSL *);
extern void SSL_CTX_set_default_read_buffer_len(SSL_CTX *, size_t);
extern int SSL_write(SSL *, const void *, int);
extern int SSL_get_error(const SSL *, int);
extern long SSL_get_verify_result(const SSL *);
extern X509 *SSL_get1_peer_certificate(const SSL *);
extern void X509_free(X509 *);
extern X509_NAME *X509_get_subject_name(const X509 *);
extern int X509_NAME_get_index_by_NID(X509_NAME *, int, int);
extern X509_NAME_ENTRY *X509_NAME_get_entry(const X509_NAME *, int);
extern ASN1_STRING *X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY *);
extern void *X509_get_ext_d2i(const X509 *, int, int *, int *);
extern const unsigned char *ASN1_STRING_get0_data(const ASN1_STRING *);
extern int ASN1_STRING_length(const ASN1_STRING *);
extern int OPENSSL_sk_num(const OPENSSL_STACK *);
extern void *OPENSSL_sk_value(const OPENSSL_STACK *, int);
extern void GENERAL_NAMES_free(OPENSSL_STACK *);
extern unsigned long ERR_get_error(void);
extern void ERR_error_string_n(unsigned long, char *, size_t);
extern void ERR_clear_error(void);
extern const char *X509_verify_cert_error_string(long);

#define SSL_FILETYPE_PEM 1
#define SSL_VERIFY_PEER 0x01
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT 0x02
#define SSL_CTRL_MODE 33
#define SSL_CTRL_SET_READ_AHEAD 41
#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define SSL_CTRL_SET_MIN_PROTO_VERSION 123
#define TLS1_3_VERSION 0x0304
#define SSL_MODE_ENABLE_PARTIAL_WRITE 0x1L
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2L
#define SSL_OP_NO_COMPRESSION 0x00020000L
#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS 0x4
#define NID_commonName 13
#define NID_subject_alt_name 85
#define GEN_URI 6

/* ---- the same constants as the Python tunnel ---- */
#define NODE_SAN "node.agentd.invalid"          /* agentd/security/channel.py */
#define ROLE_URI_PREFIX "agentd://role/"       /* agentd/security/ca.py */
#define ROLE_NODE "node"
#define CONNECT_TIMEOUT_S 10
#define BUF (256 * 1024)

static int is_exit;
static const char *listen_arg, *target_arg;
static char target_host[256], target_port[16];
static const char **allow;
static int n_allow;
static SSL_CTX *ctx;

static void logmsg(const char *level, const char *fmt, ...) {
    /* The Python tunnel's format: "%(asctime)s tunnel %(levelname)s %(message)s" */
    char stamp[64], line[1024];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    localtime_r(&tv.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s,%03d tunnel %s %s\n", stamp, (int)(tv.tv_usec / 1000), level, line);
}

static const char *tls_error(char *out, size_t size) {
    unsigned long e = ERR_get_error();
    if (!e) /* the socket's: SO_RCVTIMEO/SO_SNDTIMEO end a slow handshake with EAGAIN */
        return errno == EAGAIN || errno == EWOULDBLOCK ? "timed out" : strerror(errno ? errno : ECONNRESET);
    ERR_error_string_n(e, out, size);
    ERR_clear_error();
    return out;
}

static int split(const char *address, char *host, size_t hsize, char *port, size_t psize) {
    const char *colon = strrchr(address, ':');
    if (!colon || !colon[1])
        return -1;
    const char *h = address, *end = colon;
    if (*h == '[' && end > h && end[-1] == ']') {
        h++;
        end--;
    }
    if ((size_t)(end - h) >= hsize || strlen(colon + 1) >= psize)
        return -1;
    memcpy(host, h, end - h);
    host[end - h] = 0;
    strcpy(port, colon + 1);
    return 0;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void set_timeouts(int fd, int seconds) {
    struct timeval tv = {.tv_sec = seconds};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void set_blocking(int fd, int blocking) {
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK);
}

/* A connected socket to host:port within CONNECT_TIMEOUT_S, or -1 with errno set. */
static int dial(const char *host, const char *port) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) {
        errno = EHOSTUNREACH;
        return -1;
    }
    int fd = -1, err = ECONNREFUSED;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        set_blocking(fd, 0);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        if (errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int soerr = 0;
            socklen_t len = sizeof soerr;
            rc = poll(&p, 1, CONNECT_TIMEOUT_S * 1000);
            if (rc == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0)
                break;
            err = rc == 0 ? ETIMEDOUT : soerr ? soerr : errno;
        } else {
            err = errno;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        errno = err;
        return -1;
    }
    set_blocking(fd, 1);
    nodelay(fd);
    return fd;
}

/* Why the verified peer may not use this exit ("" when it may): tunnel.py's peer_refusal. */
static void peer_refusal(SSL *ssl, char *why, size_t size) {
    why[0] = 0;
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (!cert) {
        snprintf(why, size, "no client certificate");
        return;
    }
    char name[256] = "", role[64] = "";
    int have_role = 0;
    X509_NAME *subject = X509_get_subject_name(cert);
    int i = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
    if (i >= 0) {
        ASN1_STRING *s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));
        int n = ASN1_STRING_length(s);
        if (n > 0 && (size_t)n < sizeof name && !memchr(ASN1_STRING_get0_data(s), 0, n)) {
            memcpy(name, ASN1_STRING_get0_data(s), n);
            name[n] = 0;
        }
    }
    OPENSSL_STACK *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    size_t prefix = strlen(ROLE_URI_PREFIX);
    for (int k = 0; sans && k < OPENSSL_sk_num(sans) && !have_role; k++) {
        GENERAL_NAME *g = OPENSSL_sk_value(sans, k);
        if (g->type != GEN_URI)
            continue;
        const char *uri = (const char *)ASN1_STRING_get0_data(g->value);
        size_t n = (size_t)ASN1_STRING_length(g->value);
        if (n <= prefix || memcmp(uri, ROLE_URI_PREFIX, prefix) || n - prefix >= sizeof role)
            continue;
        memcpy(role, uri + prefix, n - prefix);
        role[n - prefix] = 0;
        have_role = !strcmp(role, ROLE_NODE) || !strcmp(role, "admin"); /* ca.ROLES */
    }
    if (sans)
        GENERAL_NAMES_free(sans);
    X509_free(cert);
    if (!have_role || strcmp(role, ROLE_NODE)) {
        snprintf(why, size, "certificate of '%s' has role %s%s%s, not 'node'", name, have_role ? "'" : "",
                 have_role ? role : "None", have_role ? "'" : "");
        return;
    }
    if (n_allow) {
        for (int k = 0; k < n_allow; k++)
            if (!strcmp(allow[k], name))
                return;
        char hosts[512] = "";
        for (int k = 0; k < n_allow; k++) /* sorted in main, as tunnel.py lists them */
            snprintf(hosts + strlen(hosts), sizeof hosts - strlen(hosts), "%s%s", k ? ", " : "", allow[k]);
        snprintf(why, size, "host '%s' is not one this tunnel serves (%s)", name, hosts);
    }
}

/* Copy both ways until either side ends. Both sockets non-blocking; buffers per direction keep what a full
 * socket has not taken yet (SSL_write is retried with the same bytes, as OpenSSL requires).
 *
 * Each step runs only when it can progress: a flag per step says "try it", cleared when it would block and
 * set again by poll. So a message costs poll, one read and one write per hop (OpenSSL reads ahead, so a TLS
 * record is one read, not a header read and a body read), and no read that is sure to find nothing: ggml
 * RPC sends 15-19 small messages per generated token, and the relay's CPU is taken from the model's. */
static void relay(SSL *ssl, int tls_fd, int plain_fd) {
    char *up = malloc(BUF), *down = malloc(BUF); /* up: plain -> TLS; down: TLS -> plain */
    size_t up_len = 0, up_off = 0, down_len = 0, down_off = 0;
    /* try-flags; what SSL_read / SSL_write wait for on the TLS socket when theirs is clear */
    int tls_read = 1, tls_write = 1, plain_read = 1, plain_write = 1;
    short read_waits = POLLIN, write_waits = POLLOUT;
    if (!up || !down)
        goto done;
    set_blocking(tls_fd, 0);
    set_blocking(plain_fd, 0);
    for (;;) {
        int progress = 0;
        /* TLS -> plain (first: what came with the handshake is already in OpenSSL's buffer) */
        if (!down_len && tls_read) {
            int n = SSL_read(ssl, down, BUF);
            if (n > 0) {
                down_len = n;
                down_off = 0;
                progress = 1;
                while (down_len < BUF && SSL_has_pending(ssl)) { /* records already read leave in one send */
                    n = SSL_read(ssl, down + down_len, (int)(BUF - down_len));
                    if (n <= 0)
                        break; /* the next SSL_read above meets it again */
                    down_len += n;
                }
                tls_read = SSL_has_pending(ssl);
            } else {
                int e = SSL_get_error(ssl, n);
                if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                    goto done;
                tls_read = 0;
                read_waits = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
            }
        }
        if (down_len && plain_write) {
            ssize_t n = send(plain_fd, down + down_off, down_len - down_off, MSG_NOSIGNAL);
            if (n > 0) {
                down_off += n;
                progress = 1;
                if (down_off == down_len)
                    down_len = 0;
                else
                    plain_write = 0; /* the socket took what it had room for */
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                plain_write = 0;
            } else if (errno != EINTR) {
                goto done;
            }
        }
        /* plain -> TLS */
        if (!up_len && plain_read) {
            ssize_t n = recv(plain_fd, up, BUF, 0);
            if (n > 0) {
                up_len = n;
                up_off = 0;
                progress = 1;
                plain_read = n == BUF; /* a full buffer: more may wait */
            } else if (n == 0) {
                goto done;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                plain_read = 0;
            } else if (errno != EINTR) {
                goto done;
            }
        }
        if (up_len && tls_write) {
            int n = SSL_write(ssl, up + up_off, (int)(up_len - up_off));
            if (n > 0) {
                up_off += n;
                progress = 1;
                if (up_off == up_len)
                    up_len = 0;
            } else {
                int e = SSL_get_error(ssl, n);
                if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                    goto done;
                tls_write = 0;
                write_waits = e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
            }
        }
        if (progress)
            continue;
        struct pollfd p[2] = {
            {.fd = tls_fd,
             .events = (short)((!down_len && !tls_read ? read_waits : 0) | (up_len && !tls_write ? write_waits : 0))},
            {.fd = plain_fd,
             .events = (short)((!up_len && !plain_read ? POLLIN : 0) | (down_len && !plain_write ? POLLOUT : 0))},
        };
        int rc = poll(p, 2, -1);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            goto done;
        }
        /* A hang-up or error with nothing read from that socket would wake poll forever: end instead. (With
         * POLLIN asked, the next read sees the EOF or the error itself, after the data before it.) */
        for (int k = 0; k < 2; k++)
            if ((p[k].revents & (POLLERR | POLLHUP | POLLNVAL)) && !(p[k].events & POLLIN))
                goto done;
        short bad = POLLERR | POLLHUP;
        if (p[0].revents & (read_waits | bad))
            tls_read = 1;
        if (p[0].revents & (write_waits | bad))
            tls_write = 1;
        if (p[1].revents & (POLLIN | bad))
            plain_read = 1;
        if (p[1].revents & (POLLOUT | bad))
            plain_write = 1;
    }
done:
    free(up);
    free(down);
}

struct conn {
    int fd;
    char peer[80];
};

static void serve_exit(struct conn *c) {
    int up = -1;
    SSL *ssl = SSL_new(ctx);
    set_timeouts(c->fd, CONNECT_TIMEOUT_S);
    char err[256], why[768];
    if (!ssl || !SSL_set_fd(ssl, c->fd)) {
        logmsg("WARNING", "tunnel refused a connection: %s (from %s)", tls_error(err, sizeof err), c->peer);
        goto out;
    }
    errno = 0;
    int rc = SSL_accept(ssl);
    if (rc != 1) {
        long v = SSL_get_verify_result(ssl);
        const char *reason = v ? X509_verify_cert_error_string(v) : tls_error(err, sizeof err);
        if (rc == 0 && !v && SSL_get_error(ssl, rc) == SSL_ERROR_SYSCALL)
            reason = "connection closed during the TLS handshake";
        logmsg("WARNING", "tunnel refused a connection: %s (from %s)", reason, c->peer);
        goto out;
    }
    peer_refusal(ssl, why, sizeof why);
    if (why[0]) {
        logmsg("WARNING", "tunnel refused a connection: %s (from %s)", why, c->peer);
        goto out;
    }
    up = dial(target_host, target_port);
    if (up < 0) {
        logmsg("WARNING", "tunnel could not reach %s: %s", target_arg, strerror(errno));
        goto out;
    }
    set_timeouts(c->fd, 0);
    relay(ssl, c->fd, up);
out:
    if (ssl)
        SSL_free(ssl);
    if (up >= 0)
        close(up);
}

static void serve_entry(struct conn *c) {
    SSL *ssl = NULL;
    char err[256];
    int raw = dial(target_host, target_port);
    if (raw < 0) {
        logmsg("WARNING", "tunnel could not reach its exit %s: %s", target_arg, strerror(errno));
        return;
    }
    set_timeouts(raw, CONNECT_TIMEOUT_S);
    ssl = SSL_new(ctx);
    if (!ssl || !SSL_set_fd(ssl, raw) || !SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, 0, NODE_SAN) ||
        !SSL_set1_host(ssl, NODE_SAN)) {
        logmsg("WARNING", "tunnel could not reach its exit %s: %s", target_arg, tls_error(err, sizeof err));
        goto out;
    }
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS); /* as Python's client context */
    errno = 0;
    if (SSL_connect(ssl) != 1) {
        long v = SSL_get_verify_result(ssl);
        logmsg("WARNING", "tunnel could not reach its exit %s: %s", target_arg,
               v ? X509_verify_cert_error_string(v) : tls_error(err, sizeof err));
        goto out;
    }
    set_timeouts(raw, 0);
    relay(ssl, raw, c->fd);
out:
    if (ssl)
        SSL_free(ssl);
    close(raw);
}

static void *connection(void *arg) {
    struct conn *c = arg;
    if (is_exit)
        serve_exit(c);
    else
        serve_entry(c);
    close(c->fd);
    free(c);
    return NULL;
}

static int make_context(const char *tls_dir) {
    char crt[4096], key[4096], ca[4096];
    snprintf(crt, sizeof crt, "%s/node.crt", tls_dir);
    snprintf(key, sizeof key, "%s/node.key", tls_dir);
    snprintf(ca, sizeof ca, "%s/ca.crt", tls_dir);
    char err[256];
    ctx = SSL_CTX_new(is_exit ? TLS_server_method() : TLS_client_method());
    if (!ctx || !SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_3_VERSION, NULL)) {
        fprintf(stderr, "tunnel: %s\n", tls_error(err, sizeof err));
        return -1;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION);
    SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    SSL_CTX_ctrl(ctx, SSL_CTRL_SET_READ_AHEAD, 1, NULL); /* one read per record, or several */
    SSL_CTX_set_default_read_buffer_len(ctx, BUF);
    const char *failed = NULL;
    if (access(crt, R_OK) || access(key, R_OK) || access(ca, R_OK)) {
        failed = access(crt, R_OK) ? crt : access(key, R_OK) ? key : ca;
        fprintf(stderr, "tunnel: [Errno %d] %s: '%s'\n", errno, strerror(errno), failed);
        return -1;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, crt) != 1)
        failed = crt;
    else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(ctx) != 1)
        failed = key;
    else if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        failed = ca;
    if (failed) {
        fprintf(stderr, "tunnel: %s: %s\n", failed, tls_error(err, sizeof err));
        return -1;
    }
    SSL_CTX_set_verify(ctx, is_exit ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_PEER, NULL);
    if (is_exit)
        SSL_CTX_set_num_tickets(ctx, 0); /* no resumption wanted, as tunnel.py's server_context */
    return 0;
}

static int listen_on(const char *address) {
    char host[256], port[16];
    if (split(address, host, sizeof host, port, sizeof port)) {
        fprintf(stderr, "tunnel: bad address %s (HOST:PORT)\n", address);
        return -1;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
    int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (rc) {
        fprintf(stderr, "tunnel: %s: %s\n", address, gai_strerror(rc));
        return -1;
    }
    int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol), one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(fd, res->ai_addr, res->ai_addrlen) || listen(fd, 128)) {
        fprintf(stderr, "tunnel: [Errno %d] %s\n", errno, strerror(errno));
        freeaddrinfo(res);
        if (fd >= 0)
            close(fd);
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

static void peer_text(struct sockaddr_storage *ss, char *out, size_t size) {
    char host[64] = "?", port[16] = "?";
    getnameinfo((struct sockaddr *)ss, sizeof *ss, host, sizeof host, port, sizeof port,
                NI_NUMERICHOST | NI_NUMERICSERV);
    snprintf(out, size, "('%s', %s)", host, port);
}

static volatile sig_atomic_t stopping;
static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

static int by_name(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int usage(const char *why) {
    fprintf(stderr, "usage: relay {exit,entry} --listen HOST:PORT --to HOST:PORT --tls-dir DIR [--allow NODE]...\n"
                    "relay: error: %s\n", why);
    return 2;
}

int main(int argc, char **argv) {
    const char *tls_dir = NULL;
    if (argc > 3 && !strcmp(argv[1], "-m") && !strcmp(argv[2], "agentd.security.tunnel")) {
        argv += 2; /* as tunnel.py execs it: the command line agentd launched stays the process's own */
        argc -= 2;
    }
    if (argc < 2 || (strcmp(argv[1], "exit") && strcmp(argv[1], "entry")))
        return usage("the first argument is exit or entry");
    is_exit = !strcmp(argv[1], "exit");
    allow = calloc(argc, sizeof *allow);
    for (int i = 2; i < argc; i += 2) {
        if (i + 1 >= argc)
            return usage("an option without its value");
        if (!strcmp(argv[i], "--listen"))
            listen_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--to"))
            target_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--tls-dir"))
            tls_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--allow"))
            allow[n_allow++] = argv[i + 1];
        else
            return usage("unknown option");
    }
    if (!listen_arg || !target_arg || !tls_dir)
        return usage("--listen, --to and --tls-dir are required");
    if (split(target_arg, target_host, sizeof target_host, target_port, sizeof target_port))
        return usage("--to is HOST:PORT");
    qsort(allow, n_allow, sizeof *allow, by_name);
    if (make_context(tls_dir))
        return 1;
    int lfd = listen_on(listen_arg);
    if (lfd < 0)
        return 1;
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: accept returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    logmsg("INFO", "%s %s -> %s", argv[1], listen_arg, target_arg);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    while (!stopping) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                usleep(100 * 1000); /* out of descriptors or memory: the connection waits in the backlog */
                continue;
            }
            break;
        }
        nodelay(fd);
        struct conn *c = malloc(sizeof *c);
        pthread_t t;
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        peer_text(&ss, c->peer, sizeof c->peer);
        /* SIGTERM/SIGINT go to this thread only (a thread inherits the mask): a connection's thread that took
         * one would leave accept4 waiting and the process running */
        pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
        int failed = pthread_create(&t, &attr, connection, c);
        pthread_sigmask(SIG_UNBLOCK, &stop_signals, NULL);
        if (failed) {
            close(fd);
            free(c);
        }
    }
    close(lfd);
    return 0;
}
