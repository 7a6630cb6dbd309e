/*
 * malloc_count.c: an LD_PRELOAD interposer that counts heap allocations of the process it is
 * loaded into, for tests and measurements of allocations per call (test_search_allocs,
 * bench/search_allocs.sh).
 *
 * With AFF_MALLOC_COUNT_FILE=<path> in the environment, the constructor creates <path> as
 * one shared page holding a malloc_count_page (below) and every malloc, calloc, realloc,
 * posix_memalign, aligned_alloc, memalign, valloc and pvalloc of any thread increments
 * `allocs` there (free is counted in `frees`). Another process reads the page (mmap or pread)
 * at any time: the difference between two readings over a known number of calls is the
 * allocations per call, startup and loading excluded. Without the variable it counts nothing
 * and costs one branch per call.
 *
 * The real allocator is found with dlsym(RTLD_NEXT); calloc calls made by dlsym itself before
 * that are served from a small static arena. Not for sanitizer builds (ASan must interpose
 * first).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h> /* memalign, pvalloc */
#include <sys/mman.h>
#include <unistd.h>

#include "malloc_count.h"

static malloc_count_page *page;

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void *(*real_pvalloc)(size_t);

/* dlsym's own early calloc calls. */
static _Alignas(16) unsigned char boot_arena[4096];
static size_t boot_used;

static int boot_owns(const void *p)
{
    return (const unsigned char *)p >= boot_arena &&
           (const unsigned char *)p < boot_arena + sizeof boot_arena;
}

static void resolve(void)
{
    static _Thread_local int resolving;
    if (real_malloc || resolving) return;
    resolving = 1;
    real_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    real_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    real_posix_memalign = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc");
    real_memalign = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "memalign");
    real_valloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "valloc");
    real_pvalloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "pvalloc");
    real_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    resolving = 0;
}

static inline void count_alloc(void)
{
    if (page) atomic_fetch_add_explicit(&page->allocs, 1, memory_order_relaxed);
}

__attribute__((constructor)) static void malloc_count_init(void)
{
    resolve();
    const char *path = getenv("AFF_MALLOC_COUNT_FILE");
    if (!path || !*path) return;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return;
    if (ftruncate(fd, sizeof(malloc_count_page)) == 0) {
        void *m = mmap(NULL, sizeof(malloc_count_page), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED) page = m;
    }
    close(fd);
}

void *malloc(size_t n)
{
    resolve();
    if (!real_malloc) return NULL;
    count_alloc();
    return real_malloc(n);
}

void *calloc(size_t n, size_t size)
{
    resolve();
    if (!real_calloc) { /* dlsym resolving */
        size_t bytes = (n * size + 15) & ~(size_t)15;
        if (boot_used + bytes > sizeof boot_arena) return NULL;
        void *p = boot_arena + boot_used;
        boot_used += bytes;
        return p; /* static storage: already zero */
    }
    count_alloc();
    return real_calloc(n, size);
}

void *realloc(void *p, size_t n)
{
    resolve();
    if (boot_owns(p)) {
        void *q = malloc(n);
        if (q) memcpy(q, p, n < 64 ? n : 64);
        return q;
    }
    count_alloc();
    return real_realloc(p, n);
}

void free(void *p)
{
    if (!p || boot_owns(p)) return;
    resolve();
    if (page) atomic_fetch_add_explicit(&page->frees, 1, memory_order_relaxed);
    real_free(p);
}

int posix_memalign(void **out, size_t align, size_t n)
{
    resolve();
    count_alloc();
    return real_posix_memalign(out, align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
    resolve();
    count_alloc();
    return real_aligned_alloc(align, n);
}

void *memalign(size_t align, size_t n)
{
    resolve();
    count_alloc();
    return real_memalign(align, n);
}

void *valloc(size_t n)
{
    resolve();
    count_alloc();
    return real_valloc(n);
}

void *pvalloc(size_t n)
{
    resolve();
    count_alloc();
    return real_pvalloc(n);
}
