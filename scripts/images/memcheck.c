/* Test app for restore_memory (issue 33 goal 4): does memory that was dumped behave, after a restore, as the app
 * left it? Before it listens (so before the checkpoint) it builds regions of known content; a restore then maps
 * (restore_memory: map) or copies them from the pages images. Each request's checks run on those regions, not on
 * memory made after the restore, because only dumped pages can differ between the two paths.
 *
 * Usage: memcheck PORT   (busybox test image; a jemalloc twin, memcheck-je, is its child: see below)
 * Line protocol, any number of commands per connection, served one connection at a time:
 *   check  runs every check once per instance (they consume their regions), one line each, then "END":
 *          `name PASS|FAIL|DIFF detail`, plus `visible INFO ...`
 *   poke   writes 0x5E over the checksum region's first 16 pages: "poked"
 *   peek   says what that region holds now: "dump" (the bytes it was dumped with), "poked", or "other"
 * Verdicts: PASS is what anonymous memory gives (what the app was written for); DIFF is what a private file
 * mapping of the dump gives instead (the dump's bytes come back, EINVAL, SIGBUS, EFAULT): the kernel's documented
 * file semantics, predicted in docs/restore-memory.md; FAIL is neither (corruption, or a check that could not tell).
 * Each check's expectation lives in its own function's comment and verdict lines, nowhere else.
 * `vma=` in a detail says what /proc/self/maps showed for the region before the check: anon, file (a pages-N.img
 * mapping) or mixed. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

#define PG 4096UL
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

static sigjmp_buf jump;
static volatile sig_atomic_t armed;

static void on_fault(int sig) {
    if (!armed) { signal(sig, SIG_DFL); raise(sig); }  /* a fault outside a probe is a real crash */
    armed = 0;
    siglongjmp(jump, sig);
}

static void catch_faults(void) {
    struct sigaction sa = {.sa_handler = on_fault};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGSEGV, &sa, NULL);
}

/* Read (or write, if value >= 0) one page; the signal that stopped it, or 0. */
static int probe(volatile unsigned char *p, int value, unsigned char *out) {
    int sig = sigsetjmp(jump, 1);
    if (sig) return sig;
    armed = 1;
    if (value >= 0) for (size_t i = 0; i < PG; i++) p[i] = (unsigned char)value;
    else *out = p[0];
    armed = 0;
    return 0;
}

/* Its own VMA: PROT_NONE guards either side stop the kernel merging it with a neighbour. */
__attribute__((unused)) static unsigned char *region(size_t pages) {
    unsigned char *p = mmap(NULL, (pages + 2) * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p + PG, pages * PG, PROT_READ | PROT_WRITE)) { perror("memcheck"); exit(1); }
    return p + PG;
}

static int page_is(const unsigned char *p, unsigned char v) {
    for (size_t i = 0; i < PG; i++) if (p[i] != v) return 0;
    return 1;
}

struct scan { int zero, dump, other, fault, first_other; };

/* Each page: all zero, all `fill` (the dump's bytes), a fault on reading, or anything else. */
__attribute__((unused)) static struct scan scan(unsigned char *p, size_t pages, unsigned char fill) {
    struct scan s = {0, 0, 0, 0, -1};
    for (size_t i = 0; i < pages; i++) {
        unsigned char b;
        if (probe(p + i * PG, -1, &b)) { s.fault++; continue; }
        if (page_is(p + i * PG, 0)) s.zero++;
        else if (page_is(p + i * PG, fill)) s.dump++;
        else { s.other++; if (s.first_other < 0) s.first_other = (int)i; }
    }
    return s;
}

/* What /proc/self/maps shows over [p, p+len): anon, file (pages-N.img) or mixed. */
static const char *vma_kind(const void *p, size_t len) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return "unknown";
    uintptr_t a = (uintptr_t)p, b = a + len;
    int file = 0, anon = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) != 2 || hi <= a || lo >= b) continue;
        if (strstr(line, "pages-")) file++; else anon++;
    }
    fclose(f);
    return file && anon ? "mixed" : file ? "file" : anon ? "anon" : "none";
}

/* Two kinds seen over parts of one set of memory, as one. */
__attribute__((unused)) static const char *vma_join(const char *a, const char *b) {
    if (!a || !strcmp(a, b)) return b;
    return "mixed";
}

/* The kind over the whole span of a set of blocks (a heap's, from the lowest to the highest). */
__attribute__((unused)) static const char *vma_span(unsigned char **blocks, int n, size_t len) {
    unsigned char *lo = blocks[0], *hi = blocks[0];
    for (int i = 1; i < n; i++) { if (blocks[i] < lo) lo = blocks[i]; if (blocks[i] > hi) hi = blocks[i]; }
    return vma_kind(lo, (size_t)(hi - lo) + len);
}

static int conn = -1;

static void say(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (write(conn, buf, (size_t)n) < 0) return;
}

#ifdef JEMALLOC
/* memcheck-je: jemalloc's own purge and zeroed-extent logic (Debian's libjemalloc.a, 5.3), as Redis uses it.
 * Before the dump: 32 live 1 MiB extents full of 0x5A. Check: free them, force a purge of every arena (jemalloc
 * takes decommit's failure under overcommit, then MADV_DONTNEED's success, to mean "zeroed"), then 32 zeroed
 * allocations. PASS: all zero. DIFF: the dump's 0x5A came back through a "zeroed" extent (calloc skipped its
 * memset: Redis's hazard). FAIL: other bytes, or no extent was reused (then the check could not tell). */
#define JE_N 32
#define JE_SIZE (1UL << 20)
static unsigned char *je[JE_N];

static void je_setup(void) {
    for (int i = 0; i < JE_N; i++) { je[i] = mallocx(JE_SIZE, 0); memset(je[i], 0x5A, JE_SIZE); }
}

static void je_check(void) {
    const char *vma = NULL;  /* over every extent: a restore may have mapped some and read others */
    for (int i = 0; i < JE_N; i++) vma = vma_join(vma, vma_kind(je[i], JE_SIZE));
    unsigned char *old[JE_N];
    for (int i = 0; i < JE_N; i++) { old[i] = je[i]; dallocx(je[i], 0); }
    char name[64];
    snprintf(name, sizeof name, "arena.%u.purge", (unsigned)MALLCTL_ARENAS_ALL);
    int rc = mallctl(name, NULL, NULL, NULL, 0);
    /* by byte: with cache-oblivious placement an extent's allocation starts at a random cache line of its first
     * page, so a reused extent need not start where the old one did */
    long reused = 0, zero = 0, dump = 0, other = 0;
    for (int i = 0; i < JE_N; i++) {
        unsigned char *p = mallocx(JE_SIZE, MALLOCX_ZERO);
        for (int j = 0; j < JE_N; j++)
            if (p + PG > old[j] && p < old[j] + PG) { reused++; break; }
        for (size_t k = 0; k < JE_SIZE; k++) {
            if (!p[k]) zero++; else if (p[k] == 0x5A) dump++; else other++;
        }
    }
    const char *v = rc || !reused || other ? "FAIL" : dump ? "DIFF" : "PASS";
    say("jemalloc_purge_calloc %s purge_rc=%d reused=%ld/%d zero_bytes=%ld dump_bytes=%ld other_bytes=%ld vma=%s", v,
        rc, reused, JE_N,
        zero, dump, other, vma);
}

int main(void) {
    /* fd 0: commands from memcheck, fd 1: answers; the extents exist before it says "ready" */
    catch_faults();
    je_setup();
    conn = 1;
    say("ready");
    char c;
    while (read(0, &c, 1) == 1) { je_check(); say("END"); }
    return 0;
}
#else

/* Region contents before the dump; the checks compare with these. */
static unsigned char *dn, *fr, *rg, *rg2, *fk, *wipe, *nofork, *mp, *xs, *lk, *rl;
#define DN_PAGES 64
#define XS_PAGES 2048 /* 8 MiB */
#define MAIN_N 4000
static unsigned char *main_blocks[MAIN_N];
static void *pin;
static long vmlck_before;

static uint64_t xorshift(uint64_t *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

static long vmlck(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f)) if (sscanf(line, "VmLck: %ld", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

static void fill_pages(unsigned char *p, size_t from, size_t to, unsigned char v) {
    memset(p + from * PG, v, (to - from) * PG);
}

/* dontneed_zero: 64 pages of 0xA5, pages 8-15 never touched (a hole: the dump splits the region into a short run,
 * a hole and a run of 48 pages that the map path maps). MADV_DONTNEED over all of it. PASS: every page zero
 * (anonymous memory's zero-fill-on-demand). DIFF: only zero pages and 0xA5 pages (the file refilled them).
 * FAIL: anything else. */
static void check_dontneed(void) {
    const char *vma = vma_kind(dn, DN_PAGES * PG);
    int rc = madvise(dn, DN_PAGES * PG, MADV_DONTNEED);
    struct scan s = scan(dn, DN_PAGES, 0xA5);
    const char *v = rc || s.other || s.fault ? "FAIL" : s.zero == DN_PAGES ? "PASS" : "DIFF";
    say("dontneed_zero %s rc=%d zero=%d dump=%d other=%d fault=%d vma=%s", v, rc, s.zero, s.dump, s.other,
        s.fault, vma);
}

/* madv_free: 32 pages of 0xB6. MADV_FREE, then a write that must persist. PASS: it returns 0, each page reads its
 * old bytes or zero, the write persists. DIFF: EINVAL (MADV_FREE works on anonymous VMAs only), the old bytes
 * stay, the write persists. FAIL: anything else. */
static void check_madv_free(void) {
    const char *vma = vma_kind(fr, 32 * PG);
    int rc = madvise(fr, 32 * PG, MADV_FREE), e = rc ? errno : 0;
    struct scan s = scan(fr, 32, 0xB6);
    fill_pages(fr, 0, 32, 0x4B);
    struct scan w = scan(fr, 32, 0x4B);
    int kept = w.dump == 32;
    const char *v = s.other || s.fault || !kept ? "FAIL"
                    : rc == 0 ? "PASS"
                    : e == EINVAL && s.dump == 32 ? "DIFF" : "FAIL";
    say("madv_free %s rc=%d errno=%s zero=%d old=%d other=%d write_kept=%d vma=%s", v, rc, e ? strerror(e) : "0",
        s.zero, s.dump, s.other, kept, vma);
}

/* calloc_after_trim (glibc): blocks of 0x77 in the main arena (brk heap) and in a second thread's arena (an mmapped
 * heap), allocated before the dump; a pinned block stops the trim from giving the whole heap back. Check: free
 * them, malloc_trim(0) (MADV_DONTNEED of free chunks' interiors), calloc the same sizes. PASS: all zero (glibc
 * clears every chunk that is not fresh from the kernel, so it never trusts DONTNEED). DIFF: 0x77 came back.
 * FAIL: anything else. */
static int pipe_to_thread[2], pipe_from_thread[2];

struct zeros { int blocks, zero, dump, other; };

static struct zeros calloc_after_trim(unsigned char **blocks) {
    struct zeros z = {MAIN_N, 0, 0, 0};
    for (int i = 0; i < MAIN_N; i++) free(blocks[i]);
    malloc_trim(0);
    for (int i = 0; i < MAIN_N; i++) {
        unsigned char *p = calloc(1, 1024);
        int nz = 0, dump = 1;
        for (int j = 0; j < 1024; j++) { nz |= p[j]; dump &= p[j] == 0x77; }
        if (!nz) z.zero++; else if (dump) z.dump++; else z.other++;
        blocks[i] = p;
    }
    return z;
}

static void *arena_thread(void *arg) {
    (void)arg;
    unsigned char *blocks[MAIN_N];
    for (int i = 0; i < MAIN_N; i++) { blocks[i] = malloc(1024); memset(blocks[i], 0x77, 1024); }
    void *pin = malloc(1024);
    char vma[16];
    char c;
    if (write(pipe_from_thread[1], "r", 1) != 1) return pin;
    while (read(pipe_to_thread[0], &c, 1) == 1) {
        snprintf(vma, sizeof vma, "%s", vma_span(blocks, MAIN_N, 1024));
        struct zeros z = calloc_after_trim(blocks);
        char out[128];
        int n = snprintf(out, sizeof out, "thread: zero=%d dump=%d other=%d vma=%s", z.zero, z.dump, z.other, vma);
        if (write(pipe_from_thread[1], out, (size_t)n + 1) < 0) break;
    }
    return pin;
}

static void check_calloc(void) {
    const char *vma = vma_span(main_blocks, MAIN_N, 1024);
    struct zeros m = calloc_after_trim(main_blocks);
    char thread[128] = "thread: no answer";
    if (write(pipe_to_thread[1], "c", 1) == 1) {
        ssize_t n = 0, got;
        while (n < (ssize_t)sizeof thread - 1 && (got = read(pipe_from_thread[0], thread + n, 1)) == 1 && thread[n])
            n++;
        thread[n] = 0;
    }
    int tz = -1, td = -1, to = -1;
    sscanf(thread, "thread: zero=%d dump=%d other=%d", &tz, &td, &to);
    const char *v = m.other || to != 0 || m.zero + m.dump != MAIN_N || tz + td != MAIN_N ? "FAIL"
                    : m.dump || td ? "DIFF" : "PASS";
    say("calloc_after_trim %s main: zero=%d dump=%d other=%d vma=%s; %s", v, m.zero, m.dump, m.other, vma, thread);
}

/* jemalloc_purge_calloc: asked of the jemalloc twin (memcheck-je, a child made before the dump). */
static int je_in = -1, je_out = -1;

static void check_jemalloc(void) {
    if (je_in < 0 || write(je_in, "c", 1) != 1) { say("jemalloc_purge_calloc FAIL no memcheck-je child"); return; }
    char line[512];
    size_t n = 0;
    for (;;) {
        char c;
        if (read(je_out, &c, 1) != 1) { say("jemalloc_purge_calloc FAIL memcheck-je went away"); return; }
        if (c != '\n') { if (n < sizeof line - 1) line[n++] = c; continue; }
        line[n] = 0;
        if (!strcmp(line, "END")) return;
        say("%s", line);
        n = 0;
    }
}

/* mremap_grow: (a) 16 pages of 0xC7, one run that is the whole VMA, grown to 64 with MREMAP_MAYMOVE. PASS: the old
 * 16 pages kept, the 48 new ones zero. DIFF: the new ones read other bytes (the image's next bytes) or SIGBUS (past
 * its end). (b) 64 pages of 0xC8 with a hole at 24-31, grown to 128. PASS: it works, contents kept, new pages zero.
 * DIFF: EFAULT (the old range spans several VMAs: file, anon, file). FAIL: contents lost or another error. */
static void check_mremap(void) {
    const char *vma = vma_kind(rg, 16 * PG), *vma2 = vma_kind(rg2, 64 * PG);
    int fail = 0, diff = 0;
    char a[160], b[160];
    unsigned char *q = mremap(rg, 16 * PG, 64 * PG, MREMAP_MAYMOVE);
    if (q == MAP_FAILED) { snprintf(a, sizeof a, "grow: %s", strerror(errno)); fail = 1; }
    else {
        struct scan old = scan(q, 16, 0xC7), new = scan(q + 16 * PG, 48, 0xC7);
        if (old.dump != 16) fail = 1;
        else if (new.zero != 48) diff = 1;
        snprintf(a, sizeof a, "grow: old_kept=%d new_zero=%d new_nonzero=%d new_sigbus=%d vma=%s", old.dump,
                 new.zero, new.dump + new.other, new.fault, vma);
    }
    unsigned char *q2 = mremap(rg2, 64 * PG, 128 * PG, MREMAP_MAYMOVE);
    if (q2 == MAP_FAILED) {
        int e = errno;
        snprintf(b, sizeof b, "holey: %s vma=%s", strerror(e), vma2);
        if (e == EFAULT) diff = 1; else fail = 1;
    } else {
        struct scan s1 = scan(q2, 24, 0xC8), hole = scan(q2 + 24 * PG, 8, 0xC8), s2 = scan(q2 + 32 * PG, 32, 0xC8),
                    new = scan(q2 + 64 * PG, 64, 0xC8);
        if (s1.dump != 24 || hole.zero != 8 || s2.dump != 32) fail = 1;
        else if (new.zero != 64) diff = 1;
        snprintf(b, sizeof b, "holey: grown kept=%d new_zero=%d vma=%s", s1.dump + s2.dump, new.zero, vma2);
    }
    say("mremap_grow %s %s; %s", fail ? "FAIL" : diff ? "DIFF" : "PASS", a, b);
}

/* realloc_mmapped: a 1 MiB malloc'd chunk (glibc mmaps it: above M_MMAP_THRESHOLD) of 0xD9 made before the dump,
 * realloc'd to 4 MiB (glibc mremaps it), then every byte written. PASS: the old MiB kept and the writes land (the
 * new part's bytes before the write are the app's to ignore: shown, not judged). DIFF: SIGBUS on the write (the
 * grown file mapping ran past the image's end). FAIL: the old bytes lost. */
static void check_realloc(void) {
    const char *vma = vma_kind(rl, 1UL << 20);
    unsigned char *q = realloc(rl, 4UL << 20);
    struct scan old = scan(q, (1UL << 20) / PG, 0xD9), tail = scan(q + (1UL << 20), (3UL << 20) / PG, 0xD9);
    int faults = 0;
    for (size_t i = 0; i < (4UL << 20) / PG; i++) if (probe(q + i * PG, 0x3C, NULL)) faults++;
    struct scan w = scan(q, (4UL << 20) / PG, 0x3C);
    rl = q;
    const char *v = old.dump != 256 ? "FAIL" : faults ? "DIFF" : w.dump == 1024 ? "PASS" : "FAIL";
    say("realloc_mmapped %s old_kept=%d tail_zero=%d tail_nonzero=%d write_faults=%d vma=%s", v, old.dump,
        tail.zero, tail.dump + tail.other, faults, vma);
}

/* fork_cow: 32 pages of 0xE1; after the restore the parent writes page 0 (0x11) and forks. PASS: the child sees
 * page 0 as 0x11 and page 1 as 0xE1, its write of page 1 (0x22) stays its own; a MADV_WIPEONFORK region (0xE2) reads
 * zero in the child and a MADV_DONTFORK region (0xE3) is absent there; the parent's regions are unchanged.
 * FAIL: anything else (there is no file-mapping variant of this). */
static void check_fork(void) {
    const char *vma = vma_kind(fk, 32 * PG), *wv = vma_kind(wipe, 32 * PG), *dv = vma_kind(nofork, 32 * PG);
    fill_pages(fk, 0, 1, 0x11);
    int p[2];
    if (pipe(p)) { say("fork_cow FAIL pipe: %s", strerror(errno)); return; }
    pid_t pid = fork();
    if (pid == 0) {
        unsigned char vec[32];
        char r[5] = {
            page_is(fk, 0x11) ? '1' : '0',
            page_is(fk + PG, 0xE1) ? '1' : '0',
            scan(wipe, 32, 0xE2).zero == 32 ? '1' : '0',
            mincore(nofork, 32 * PG, vec) == -1 && errno == ENOMEM ? '1' : '0',
            0,
        };
        fill_pages(fk, 1, 2, 0x22);
        _exit(write(p[1], r, 5) == 5 ? 0 : 1);
    }
    close(p[1]);
    char r[5] = "????";
    ssize_t n = pid > 0 ? read(p[0], r, 5) : -1;
    close(p[0]);
    if (pid > 0) waitpid(pid, NULL, 0);
    int parent = page_is(fk, 0x11) && page_is(fk + PG, 0xE1) && scan(wipe, 32, 0xE2).dump == 32 &&
                 scan(nofork, 32, 0xE3).dump == 32;
    int ok = n == 5 && !strcmp(r, "1111") && parent;
    say("fork_cow %s child(p0,p1,wipe_zero,dontfork_absent)=%s parent_kept=%d vma=%s wipe_vma=%s dontfork_vma=%s",
        ok ? "PASS" : "FAIL", n == 5 ? r : "none", parent, vma, wv, dv);
}

/* mprotect: 32 pages of 0xF3. PASS: read-only then a write gets SIGSEGV; read-write then the write lands;
 * PROT_READ|PROT_EXEC succeeds (a file mapping without VM_MAYEXEC would get EACCES). FAIL: anything else. */
static void check_mprotect(void) {
    const char *vma = vma_kind(mp, 32 * PG);
    int ro = mprotect(mp, 32 * PG, PROT_READ);
    int segv = probe(mp, 0x66, NULL) == SIGSEGV && page_is(mp, 0xF3);
    int rw = mprotect(mp, 32 * PG, PROT_READ | PROT_WRITE);
    int wrote = probe(mp, 0x66, NULL) == 0 && page_is(mp, 0x66);
    int rx = mprotect(mp, 32 * PG, PROT_READ | PROT_EXEC), rx_errno = rx ? errno : 0;
    mprotect(mp, 32 * PG, PROT_READ | PROT_WRITE);
    int ok = !ro && segv && !rw && wrote && !rx;
    say("mprotect %s ro_write_segv=%d rw_write=%d rx=%s vma=%s", ok ? "PASS" : "FAIL", segv, wrote,
        rx ? strerror(rx_errno) : "ok", vma);
}

/* checksum: 8 MiB of xorshift64 from a fixed seed. PASS: every word as generated. FAIL: any other. */
static size_t xs_mismatches(size_t words) {
    uint64_t s = 0x9E3779B97F4A7C15ULL, *w = (uint64_t *)xs;
    size_t bad = 0;
    for (size_t i = 0; i < words; i++) bad += w[i] != xorshift(&s);
    return bad;
}

static void check_checksum(void) {
    const char *vma = vma_kind(xs, XS_PAGES * PG);
    size_t bad = xs_mismatches(XS_PAGES * PG / 8);
    say("checksum %s mismatched_words=%zu of %lu vma=%s", bad ? "FAIL" : "PASS", bad, XS_PAGES * PG / 8, vma);
}

/* locked: 4 mlock()ed pages of 0x1C. PASS: VmLck as before the dump, content kept. FAIL: anything else. */
static void check_locked(void) {
    long now = vmlck();
    int kept = scan(lk, 4, 0x1C).dump == 4;
    say("locked %s vmlck_kb=%ld before=%ld kept=%d vma=%s", now == vmlck_before && vmlck_before > 0 && kept ?
        "PASS" : "FAIL", now, vmlck_before, kept, vma_kind(lk, 4 * PG));
}

/* visible: not judged; what a look at /proc shows. */
static void visible(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    int lines = 0, pages = 0, heap = 0, stack = 0;
    char line[512];
    while (f && fgets(line, sizeof line, f)) {
        lines++;
        pages += strstr(line, "pages-") != NULL;
        heap |= strstr(line, "[heap]") != NULL;
        stack |= strstr(line, "[stack]") != NULL;
    }
    if (f) fclose(f);
    char cmd[64] = "";
    f = fopen("/proc/self/cmdline", "r");
    size_t n = f ? fread(cmd, 1, sizeof cmd - 1, f) : 0;
    if (f) fclose(f);
    say("visible INFO maps_lines=%d pages_lines=%d heap=%d stack=%d cmdline=%s", lines, pages, heap, stack,
        n ? cmd : "(empty)");
}

static void setup(void) {
    dn = region(DN_PAGES);
    fill_pages(dn, 0, 8, 0xA5);
    fill_pages(dn, 16, DN_PAGES, 0xA5);
    fr = region(32);
    fill_pages(fr, 0, 32, 0xB6);
    rg = region(16);
    fill_pages(rg, 0, 16, 0xC7);
    rg2 = region(64);
    fill_pages(rg2, 0, 24, 0xC8);
    fill_pages(rg2, 32, 64, 0xC8);
    fk = region(32);
    fill_pages(fk, 0, 32, 0xE1);
    wipe = region(32);
    fill_pages(wipe, 0, 32, 0xE2);
    nofork = region(32);
    fill_pages(nofork, 0, 32, 0xE3);
    if (madvise(wipe, 32 * PG, MADV_WIPEONFORK) || madvise(nofork, 32 * PG, MADV_DONTFORK)) {
        perror("memcheck: madvise");
        exit(1);
    }
    mp = region(32);
    fill_pages(mp, 0, 32, 0xF3);
    xs = region(XS_PAGES);
    uint64_t s = 0x9E3779B97F4A7C15ULL, *w = (uint64_t *)xs;
    for (size_t i = 0; i < XS_PAGES * PG / 8; i++) w[i] = xorshift(&s);
    lk = region(4);
    fill_pages(lk, 0, 4, 0x1C);
    if (mlock(lk, 4 * PG)) perror("memcheck: mlock");  /* locked then FAILs, saying before=0 */
    vmlck_before = vmlck();
    rl = malloc(1UL << 20);
    memset(rl, 0xD9, 1UL << 20);
    for (int i = 0; i < MAIN_N; i++) { main_blocks[i] = malloc(1024); memset(main_blocks[i], 0x77, 1024); }
    pin = malloc(1024);  /* the trim cannot give the blocks back by lowering brk */

    pthread_t t;
    char c;
    if (pipe(pipe_to_thread) || pipe(pipe_from_thread) || pthread_create(&t, NULL, arena_thread, NULL) ||
        read(pipe_from_thread[0], &c, 1) != 1) {
        perror("memcheck: thread");
        exit(1);
    }

    int in[2], out[2];
    if (pipe(in) || pipe(out)) { perror("memcheck: pipe"); exit(1); }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[1]);  /* so that it sees EOF, and ends, when memcheck does */
        char self[4096];  /* beside this binary: /bin in the image */
        ssize_t len = readlink("/proc/self/exe", self, sizeof self - 16);
        if (len > 0) {
            self[len] = 0;
            strcpy(strrchr(self, '/') + 1, "memcheck-je");
            execl(self, "memcheck-je", (char *)NULL);
        }
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    je_in = in[1];
    je_out = out[0];
    char ready[6];
    if (pid < 0 || read(je_out, ready, 6) != 6 || memcmp(ready, "ready\n", 6)) {
        fprintf(stderr, "memcheck: memcheck-je did not start\n");
        exit(1);
    }
}

static int ran;

static void command(const char *cmd) {
    if (!strcmp(cmd, "check")) {
        if (ran++) { say("ERROR the checks consume their regions: once per instance"); say("END"); return; }
        check_dontneed();
        check_madv_free();
        check_calloc();
        check_jemalloc();
        check_mremap();
        check_realloc();
        check_fork();
        check_mprotect();
        check_checksum();
        check_locked();
        visible();
        say("END");
    } else if (!strcmp(cmd, "poke")) {
        fill_pages(xs, 0, 16, 0x5E);
        say("poked");
    } else if (!strcmp(cmd, "peek")) {
        say(!xs_mismatches(XS_PAGES * PG / 8) ? "dump" : page_is(xs, 0x5E) ? "poked" : "other");
    } else {
        say("ERROR unknown command (check, poke, peek)");
    }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: memcheck PORT\n"); return 2; }
    catch_faults();
    setup();
    int s = socket(AF_INET6, SOCK_STREAM, 0), on = 1, off = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[1])), .sin6_addr = in6addr_any};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) { perror("memcheck"); return 1; }
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        conn = accept(s, NULL, NULL);
        if (conn < 0) continue;
        char cmd[64];
        size_t n = 0;
        char c;
        while (read(conn, &c, 1) == 1) {
            if (c == '\r') continue;
            if (c != '\n') { if (n < sizeof cmd - 1) cmd[n++] = c; continue; }
            cmd[n] = 0;
            n = 0;
            command(cmd);
        }
        close(conn);
    }
}
#endif
