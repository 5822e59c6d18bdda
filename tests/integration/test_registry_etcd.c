/* Integration tests of the instance registry over a real etcd that the test starts on loopback
 * (free ports, a temporary data dir, killed at the end): watch, liveness after kill -9 of a
 * registered process, master takeover, lease recovery, incarnations, unreachable etcd.
 * The same binary is the child process: `test_registry_etcd --child MODE ENDPOINT NAME`. */
#include "testutil.h"

#include <arpa/inet.h>
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "service/registry-impl.h"
#include "service/registry.h"
#include "registry_collector.h"

#define TTL_MS 1000 /* granted as 1 s with the etcd flags below */

/* The etcd server of this test run (the test process is single-purpose). */
static pid_t g_etcd_pid;
static char g_endpoint[64];
static char g_data_dir[512];

/* ============================================================================================ */
/* Processes                                                                                    */
/* ============================================================================================ */

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* A free port below the kernel's ephemeral range (ip_local_port_range starts at 32768 by
 * default), for etcd: test_etcd_restart stops etcd and starts it again on the same port, and a
 * port the kernel hands out (free_port) may go to another test's process in between (the
 * cluster tests start etcd on such ports) - the restarted etcd then fails to bind and the test
 * would talk to the other one. */
static int stable_port(void) {
    static uint64_t seed;
    if (!seed) seed = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull | 1;
    for (int tries = 0; tries < 1000; tries++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        int port = 20000 + (int)(seed % 12000);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        bool ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        if (fd >= 0) close(fd);
        if (ok) return port;
    }
    return free_port();
}

/* fork + exec with the child killed when this process dies; stdout to *out_fd when asked. */
static pid_t spawn(char *const argv[], const char *log_path, int *out_fd) {
    int pfd[2] = {-1, -1};
    if (out_fd && pipe(pfd) != 0) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (log_path) {
            int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
        }
        if (out_fd) {
            dup2(pfd[1], 1);
            close(pfd[0]);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    if (out_fd) {
        close(pfd[1]);
        *out_fd = pfd[0];
    }
    return pid;
}

static void kill_wait(pid_t pid) {
    if (pid <= 0) return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* Reads one line from fd within timeout_ms into line; false on timeout or EOF. */
static bool read_line(int fd, char *line, size_t cap, int timeout_ms) {
    size_t n = 0;
    int64_t deadline = xllm_registry_now_ns() + (int64_t)timeout_ms * 1000000;
    while (n + 1 < cap) {
        int left = (int)((deadline - xllm_registry_now_ns()) / 1000000);
        if (left <= 0) return false;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, left) <= 0) continue;
        char ch;
        if (read(fd, &ch, 1) != 1) return false;
        if (ch == '\n') break;
        line[n++] = ch;
    }
    line[n] = 0;
    return true;
}

static const char *find_etcd(void) {
    const char *env = getenv("XLLM_ETCD");
    if (env && access(env, X_OK) == 0) return env;
    static const char *dirs[] = {"/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin"};
    static char path[256];
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        snprintf(path, sizeof(path), "%s/etcd", dirs[i]);
        if (access(path, X_OK) == 0) return path;
    }
    return NULL;
}

static void stop_etcd(void) {
    kill_wait(g_etcd_pid);
    g_etcd_pid = 0;
    if (g_data_dir[0]) {
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_data_dir);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_data_dir);
        g_data_dir[0] = 0;
    }
}

static xllm_registry_store etcd_store(const char *endpoint, int timeout_ms) {
    xllm_registry_store st;
    char err[256];
    if (xllm_registry_etcd_store(endpoint, timeout_ms, &st, err, sizeof(err)) != XLLM_OK)
        fail_msg("etcd store: %s", err);
    return st;
}

static int g_cport, g_pport;
static bool launch_etcd(const char *bin);

static bool start_etcd(void) {
    const char *bin = find_etcd();
    if (!bin) {
        fprintf(stderr, "test_registry_etcd: FAIL: etcd not found (Debian package etcd-server; "
                        "scripts/install-deps.sh installs it, or set XLLM_ETCD)\n");
        return false;
    }
    snprintf(g_data_dir, sizeof(g_data_dir), "%s/tmp-etcd-XXXXXX", xllm_test_build_dir());
    if (!mkdtemp(g_data_dir)) {
        snprintf(g_data_dir, sizeof(g_data_dir), "/tmp/xllm-etcd-XXXXXX");
        if (!mkdtemp(g_data_dir)) return false;
    }
    g_cport = stable_port();
    g_pport = stable_port();
    while (g_pport == g_cport) g_pport = stable_port();
    return launch_etcd(bin);
}

/* Starts etcd on the chosen ports and data dir and waits until it answers. */
static bool launch_etcd(const char *bin) {
    int cport = g_cport, pport = g_pport;
    char curl_[64], purl[64], data[600], cluster[128], log[600];
    snprintf(curl_, sizeof(curl_), "http://127.0.0.1:%d", cport);
    snprintf(purl, sizeof(purl), "http://127.0.0.1:%d", pport);
    snprintf(data, sizeof(data), "%s/data", g_data_dir);
    snprintf(cluster, sizeof(cluster), "t=%s", purl);
    snprintf(log, sizeof(log), "%s/etcd.log", g_data_dir);
    if (access(log, F_OK) == 0) snprintf(log, sizeof(log), "%s/etcd-restarted.log", g_data_dir);
    snprintf(g_endpoint, sizeof(g_endpoint), "%s", curl_);
    /* Short heartbeat / election so that the minimum lease TTL is 1 s. */
    char *argv[] = {(char *)bin, "--name",
                    "t",         "--data-dir",
                    data,        "--listen-client-urls",
                    curl_,       "--advertise-client-urls",
                    curl_,       "--listen-peer-urls",
                    purl,        "--initial-advertise-peer-urls",
                    purl,        "--initial-cluster",
                    cluster,     "--heartbeat-interval",
                    "50",        "--election-timeout",
                    "500",       NULL};
    g_etcd_pid = spawn(argv, log, NULL);
    /* Wait until it answers (bounded). */
    xllm_registry_store st = etcd_store(g_endpoint, 500);
    bool up = false;
    for (int i = 0; i < 150 && !up; i++) {
        xllm_registry_kv *kvs = NULL;
        size_t n = 0;
        char err[256];
        up = st.iface->range(st.ctx, "/", true, &kvs, &n, NULL, err, sizeof(err)) == XLLM_OK;
        xllm_registry_kvs_free(kvs, n);
        if (!up) {
            if (waitpid(g_etcd_pid, NULL, WNOHANG) == g_etcd_pid) {
                g_etcd_pid = 0;
                break;
            }
            usleep(100 * 1000);
        }
    }
    st.iface->free(st.ctx);
    /* an answer from a process that is not ours (ours failed to bind the port) is no start */
    if (up && g_etcd_pid > 0 && waitpid(g_etcd_pid, NULL, WNOHANG) == g_etcd_pid) {
        g_etcd_pid = 0;
        up = false;
    }
    if (!up) fprintf(stderr, "test_registry_etcd: FAIL: etcd did not start; see %s\n", log);
    return up;
}

/* ============================================================================================ */
/* Child mode                                                                                   */
/* ============================================================================================ */

static int child_main(const char *mode, const char *endpoint, const char *name) {
    xllm_registry_params p = xllm_registry_default_params();
    p.store = etcd_store(endpoint, 2000);
    p.cluster = "it";
    p.ttl_ms = TTL_MS;
    p.campaign_ms = 100;
    xllm_registry *reg = NULL;
    char err[256];
    if (xllm_registry_new(&p, &reg, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "child: %s\n", err);
        return 1;
    }
    if (strcmp(mode, "register") == 0) {
        xllm_instance e = {(char *)name, xllm_instance_new_incarnation(), XLLM_ROLE_DECODE,
                           "127.0.0.1:7000", "{\"model\":\"tiny\"}"};
        if (xllm_registry_register(reg, &e, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "child: %s\n", err);
            return 1;
        }
        printf("ready %016llx\n", (unsigned long long)e.incarnation);
    } else {
        bool elected = false;
        if (xllm_registry_campaign(reg, name, &elected, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "child: %s\n", err);
            return 1;
        }
        while (!xllm_registry_is_leader(reg)) usleep(20 * 1000);
        printf("leader\n");
    }
    fflush(stdout);
    for (;;) pause(); /* until kill -9 */
}

static pid_t spawn_child(const char *mode, const char *name, int *out_fd) {
    char self[512];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0) fail_msg("readlink /proc/self/exe");
    self[n] = 0;
    char *argv[] = {self, "--child", (char *)mode, g_endpoint, (char *)name, NULL};
    return spawn(argv, NULL, out_fd);
}

/* ============================================================================================ */
/* Event collection                                                                             */
/* ============================================================================================ */

static xllm_registry *open_reg(collector *c, bool abandon) {
    xllm_registry_params p = xllm_registry_default_params();
    p.store = etcd_store(g_endpoint, 2000);
    p.cluster = "it";
    p.ttl_ms = TTL_MS;
    p.campaign_ms = 100;
    if (c) {
        p.on_event = on_event;
        p.on_event_user = c;
    }
    p.abandon_on_free = abandon;
    xllm_registry *reg = NULL;
    char err[256];
    if (xllm_registry_new(&p, &reg, err, sizeof(err)) != XLLM_OK) fail_msg("open: %s", err);
    return reg;
}

static double ms_since(int64_t t0) {
    return (double)(xllm_registry_now_ns() - t0) / 1e6;
}

/* ============================================================================================ */
/* Tests                                                                                        */
/* ============================================================================================ */

static void test_basic_and_watch(void **state) {
    (void)state;
    char err[256];
    collector c;
    col_init(&c);
    xllm_registry *a = open_reg(NULL, false);
    int64_t ttl = 0;
    assert_true(xllm_registry_lease(a, &ttl) != 0);
    assert_true(ttl >= 1000 && ttl <= 2000);
    xllm_instance p1 = {"p1", 0x1111, XLLM_ROLE_PREFILL, "127.0.0.1:1001", NULL};
    assert_int_equal(xllm_registry_register(a, &p1, err, sizeof(err)), XLLM_OK);
    xllm_registry *w = open_reg(&c, false);
    size_t cur = 0;
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "p1", 0x1111, 3000) >= 0);

    xllm_instance d1 = {"d1", 0x2222, XLLM_ROLE_DECODE, "127.0.0.1:1002", "{\"m\":\"x\"}"};
    assert_int_equal(xllm_registry_register(a, &d1, err, sizeof(err)), XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "d1", 0x2222, 3000) >= 0);
    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(w, XLLM_ROLE_DECODE, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 1);
    assert_string_equal(l.items[0].name, "d1");
    assert_string_equal(l.items[0].attrs, "{\"m\":\"x\"}");
    xllm_instance_list_free(&l);

    /* role switch: one CHANGED event, the key moves */
    assert_int_equal(xllm_registry_update(a, "d1", XLLM_ROLE_PREFILL, NULL, err, sizeof(err)),
                     XLLM_OK);
    long i = col_wait(&c, &cur, XLLM_REGISTRY_CHANGED, "d1", 0x2222, 3000);
    assert_true(i >= 0);
    assert_int_equal(c.evs[i].inst.role, XLLM_ROLE_PREFILL);
    assert_int_equal(xllm_registry_list(w, XLLM_ROLE_PREFILL, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 2);
    xllm_instance_list_free(&l);
    assert_int_equal(xllm_registry_deregister(a, "p1", err, sizeof(err)), XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "p1", 0x1111, 3000) >= 0);
    /* a graceful close removes d1 at once (lease revoked) */
    int64_t t0 = xllm_registry_now_ns();
    xllm_registry_free(a);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "d1", 0x2222, 3000) >= 0);
    /* revoked at close: well before an expiry could be noticed on a busy machine */
    assert_true(ms_since(t0) < TTL_MS + 3000);
    xllm_registry_free(w);
    col_destroy(&c);
}

static void test_kill9_instance(void **state) {
    (void)state;
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(&c, false);
    int fd = -1;
    pid_t pid = spawn_child("register", "victim", &fd);
    char line[128];
    bool ready = read_line(fd, line, sizeof(line), 10000);
    if (!ready) kill_wait(pid);
    assert_true(ready);
    unsigned long long inc = 0;
    assert_int_equal(sscanf(line, "ready %llx", &inc), 1);
    size_t cur = 0;
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "victim", inc, 3000) >= 0);
    /* still there after several TTLs: its keepalives work */
    usleep(2500 * 1000);
    assert_int_equal(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "victim", inc, 0), -1);
    int64_t t0 = xllm_registry_now_ns();
    kill_wait(pid);
    close(fd);
    long i = col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "victim", inc, 5000);
    double ms = ms_since(t0);
    fprintf(stderr, "kill -9: instance removed after %.0f ms (TTL %d ms)\n", ms, TTL_MS);
    assert_true(i >= 0);
    /* etcd checks lease expiry every 500 ms: TTL + that + slack */
    assert_true(ms < TTL_MS + 5000); /* generous: the machine is shared and noisy */
    xllm_registry_free(w);
    col_destroy(&c);
}

static void test_leader_takeover(void **state) {
    (void)state;
    char err[256];
    int fd = -1;
    pid_t pid = spawn_child("campaign", "svc-child", &fd);
    char line[128];
    bool ok = read_line(fd, line, sizeof(line), 10000);
    if (!ok) kill_wait(pid);
    assert_true(ok);
    assert_string_equal(line, "leader");
    xllm_registry *b = open_reg(NULL, false);
    bool elected = true;
    assert_int_equal(xllm_registry_campaign(b, "svc-b", &elected, err, sizeof(err)), XLLM_OK);
    assert_false(elected);
    char *id = NULL;
    assert_int_equal(xllm_registry_leader(b, &id, err, sizeof(err)), XLLM_OK);
    assert_string_equal(id, "svc-child");
    free(id);
    usleep(1500 * 1000);
    assert_false(xllm_registry_is_leader(b));
    int64_t t0 = xllm_registry_now_ns();
    kill_wait(pid);
    close(fd);
    while (!xllm_registry_is_leader(b) && ms_since(t0) < 5000) usleep(10 * 1000);
    double ms = ms_since(t0);
    fprintf(stderr, "kill -9 of the master: takeover after %.0f ms (TTL %d ms)\n", ms, TTL_MS);
    assert_true(xllm_registry_is_leader(b));
    assert_true(ms < TTL_MS + 5000); /* generous: the machine is shared and noisy */
    assert_int_equal(xllm_registry_leader(b, &id, err, sizeof(err)), XLLM_OK);
    assert_string_equal(id, "svc-b");
    free(id);
    /* resign: the key goes at once */
    assert_int_equal(xllm_registry_resign(b, err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_registry_leader(b, &id, err, sizeof(err)), XLLM_OK);
    assert_null(id);
    xllm_registry_free(b);
}

static void test_lease_recovery_and_incarnation(void **state) {
    (void)state;
    char err[256];
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(&c, false);
    size_t cur = 0;
    /* the store loses the session's lease: it gets a new one and registers again */
    xllm_registry *a = open_reg(NULL, true);
    xllm_instance e = {"eng", 0xaaaa, XLLM_ROLE_MIXED, "127.0.0.1:1", NULL};
    assert_int_equal(xllm_registry_register(a, &e, err, sizeof(err)), XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "eng", 0xaaaa, 3000) >= 0);
    int64_t old = xllm_registry_lease(a, NULL);
    xllm_registry_store st = etcd_store(g_endpoint, 2000);
    assert_int_equal(st.iface->lease_revoke(st.ctx, old, err, sizeof(err)), XLLM_OK);
    st.iface->free(st.ctx);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "eng", 0xaaaa, 3000) >= 0);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "eng", 0xaaaa, 3000) >= 0);
    assert_true(xllm_registry_lease(a, NULL) != old);

    /* "eng" crashes and restarts (new incarnation, other role) before its lease lapses */
    xllm_registry_free(a);
    xllm_registry *a2 = open_reg(NULL, false);
    xllm_instance e2 = {"eng", 0xbbbb, XLLM_ROLE_DECODE, "127.0.0.1:2", NULL};
    assert_int_equal(xllm_registry_register(a2, &e2, err, sizeof(err)), XLLM_OK);
    long rm = col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "eng", 0xaaaa, 3000);
    assert_true(rm >= 0);
    size_t cur2 = (size_t)rm;
    assert_true(col_wait(&c, &cur2, XLLM_REGISTRY_ADDED, "eng", 0xbbbb, 3000) > rm);
    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(w, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 1);
    assert_true(l.items[0].incarnation == 0xbbbb);
    xllm_instance_list_free(&l);
    xllm_registry_free(a2);
    xllm_registry_free(w);
    col_destroy(&c);
}

static void test_etcd_restart(void **state) {
    (void)state;
    char err[256];
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(&c, false);
    xllm_registry *a = open_reg(NULL, false);
    xllm_instance x = {"before", 0x10, XLLM_ROLE_MIXED, "127.0.0.1:1", NULL};
    assert_int_equal(xllm_registry_register(a, &x, err, sizeof(err)), XLLM_OK);
    size_t cur = 0;
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "before", 0x10, 3000) >= 0);
    /* etcd dies and comes back on the same data: the watch reconnects, the session's lease
     * (restored by etcd) keeps "before" registered */
    kill_wait(g_etcd_pid);
    g_etcd_pid = 0;
    assert_true(launch_etcd(find_etcd()));
    xllm_instance y = {"after", 0x20, XLLM_ROLE_DECODE, "127.0.0.1:2", NULL};
    xllm_status st = XLLM_ERR_IO;
    for (int i = 0; i < 30 && st != XLLM_OK; i++) {
        st = xllm_registry_register(a, &y, err, sizeof(err));
        if (st != XLLM_OK) usleep(100 * 1000);
    }
    assert_int_equal(st, XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "after", 0x20, 5000) >= 0);
    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(w, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 2);
    xllm_instance_list_free(&l);
    xllm_registry_free(a);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "before", 0x10, 3000) >= 0);
    xllm_registry_free(w);
    col_destroy(&c);
}

/* Whether every thread of process pid is stopped (state T in /proc/pid/task/ * /stat) within
 * timeout_ms. */
static bool wait_stopped(pid_t pid, int timeout_ms) {
    for (int waited = 0; waited <= timeout_ms; waited += 5) {
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
        DIR *d = opendir(path);
        if (!d) return false;
        bool all = true;
        struct dirent *e;
        while (all && (e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            char sp[300], buf[512];
            snprintf(sp, sizeof(sp), "/proc/%d/task/%s/stat", (int)pid, e->d_name);
            FILE *f = fopen(sp, "r");
            if (!f) continue; /* the thread exited */
            size_t n = fread(buf, 1, sizeof(buf) - 1, f);
            fclose(f);
            buf[n] = 0;
            const char *rp = strrchr(buf, ')'); /* state follows the command name */
            all = rp && rp[1] == ' ' && (rp[2] == 'T' || rp[2] == 't');
        }
        closedir(d);
        if (all) return true;
        usleep(5000);
    }
    return false;
}

static void test_unreachable(void **state) {
    (void)state;
    char err[256] = "";
    /* nothing listens there */
    char ep[64];
    snprintf(ep, sizeof(ep), "127.0.0.1:%d", free_port());
    xllm_registry_params p = xllm_registry_default_params();
    p.store = etcd_store(ep, 1000);
    xllm_registry *reg = NULL;
    int64_t t0 = xllm_registry_now_ns();
    assert_int_equal(xllm_registry_new(&p, &reg, err, sizeof(err)), XLLM_ERR_IO);
    assert_null(reg);
    fprintf(stderr, "unreachable etcd: \"%s\" after %.0f ms\n", err, ms_since(t0));
    assert_non_null(strstr(err, "unreachable"));
    assert_non_null(strstr(err, ep));
    assert_true(ms_since(t0) < 5000);

    /* a hung etcd (SIGSTOP): calls fail after the timeout instead of hanging */
    xllm_registry_store st = etcd_store(g_endpoint, 300);
    assert_true(g_etcd_pid > 0);
    kill(g_etcd_pid, SIGSTOP);
    /* the stop is asynchronous: a thread of etcd still running on the other core could answer
     * a request sent right away (seen on the loaded 2-core machine); wait until it shows as
     * stopped */
    assert_true(wait_stopped(g_etcd_pid, 2000));
    t0 = xllm_registry_now_ns();
    xllm_registry_kv *kvs = NULL;
    size_t n = 0;
    xllm_status s = st.iface->range(st.ctx, "/", true, &kvs, &n, NULL, err, sizeof(err));
    double ms = ms_since(t0);
    kill(g_etcd_pid, SIGCONT);
    xllm_registry_kvs_free(kvs, n);
    st.iface->free(st.ctx);
    fprintf(stderr, "stopped etcd: \"%s\" after %.0f ms\n", err, ms);
    assert_int_equal(s, XLLM_ERR_IO);
    assert_non_null(strstr(err, "no answer within"));
    assert_true(ms < 3000); /* the 300 ms timeout, not a hang */

    /* invalid endpoints are refused up front */
    assert_int_equal(xllm_registry_etcd_store("", 0, &st, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_registry_etcd_store("https://x:1", 0, &st, err, sizeof(err)),
                     XLLM_ERR_UNSUPPORTED);
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "--child") == 0) return child_main(argv[2], argv[3], argv[4]);
    if (!start_etcd()) {
        stop_etcd();
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic_and_watch),
        cmocka_unit_test(test_kill9_instance),
        cmocka_unit_test(test_leader_takeover),
        cmocka_unit_test(test_lease_recovery_and_incarnation),
        cmocka_unit_test(test_etcd_restart),
        cmocka_unit_test(test_unreachable),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    stop_etcd();
    return rc;
}
