/*
 * transport_guard.h: the server's connection guard. gRPC 1.51's listener stops accepting for
 * good after one accept4 failure other than EAGAIN (EMFILE, ENFILE, ENOBUFS ...), so a burst
 * of connections that exhausts the descriptors would disable the server until restart. The
 * guard wraps accept4 (and close, to count connections) so that gRPC never sees such an
 * error: it enforces a connection limit below RLIMIT_NOFILE, and when descriptors run out
 * anyway it sheds the waiting connections with a reserve descriptor and reports EAGAIN, so
 * the listener stays armed and accepts again as soon as descriptors free.
 *
 * Only transport.c calls these; before transport__guard_start (and after _stop) the wrappers
 * pass every call straight to the C library.
 */
#ifndef AFFINITY_TRANSPORT_GUARD_H
#define AFFINITY_TRANSPORT_GUARD_H

#include <stdint.h>

/* Starts guarding: at most max_connections accepted connections open at once (0: RLIMIT_NOFILE
 * less a headroom for storage and gRPC's own descriptors). Returns the limit in force.
 * Process-wide: one server per process. */
uint32_t transport__guard_start(uint32_t max_connections);
/* Stops guarding (the wrappers pass through again) and releases the reserve descriptor. */
void transport__guard_stop(void);
/* Connections open now and connections refused so far (limit or descriptors). */
void transport__guard_counts(uint32_t *open, uint64_t *refused);

#endif
