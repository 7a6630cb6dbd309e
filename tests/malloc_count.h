/*
 * malloc_count.h: the shared page that malloc_count.c (an LD_PRELOAD interposer) keeps up to
 * date in the process it is loaded into, and a reader for it.
 */
#ifndef AFFINITY_TESTS_MALLOC_COUNT_H
#define AFFINITY_TESTS_MALLOC_COUNT_H

#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

typedef struct malloc_count_page {
    _Atomic uint64_t allocs; /* malloc, calloc, realloc and the aligned variants */
    _Atomic uint64_t frees;
} malloc_count_page;

/* The current allocation count in the page at path, or UINT64_MAX when unreadable. */
static inline uint64_t malloc_count_read(const char *path)
{
    malloc_count_page p;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return UINT64_MAX;
    ssize_t got = pread(fd, &p, sizeof p, 0);
    close(fd);
    return got == (ssize_t)sizeof p ? (uint64_t)p.allocs : UINT64_MAX;
}

#endif
