/*
 * strmap.h: a hash map from NUL-terminated strings to uint32_t values.
 *
 * Open addressing with linear probing and backward-shift deletion; each slot keeps the key's
 * 64-bit hash so most probes never touch the key bytes. The map owns its keys: strmap_put
 * copies the key, strmap_put_owned takes ownership of a malloc'ed key, and strmap_remove frees
 * it. A pointer returned through key_out stays valid until that key is removed or the map is
 * destroyed (rehashing moves slots, not keys). Not thread-safe: callers lock.
 */
#ifndef AFFINITY_STRMAP_H
#define AFFINITY_STRMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct strmap strmap;

/* Creates an empty map with room for `expected` keys before it rehashes. */
int strmap_create(strmap **out, size_t expected);
void strmap_destroy(strmap *m);

/* True and *value set when key is present. */
bool strmap_get(const strmap *m, const char *key, uint32_t *value);
/* Inserts key (copied) or updates its value. *key_out, when not NULL, receives the map's copy
 * of the key. Returns 0 or AFF_ENOMEM (the map is unchanged then). */
int strmap_put(strmap *m, const char *key, uint32_t value, const char **key_out);
/* Like strmap_put but takes ownership of `key` (malloc'ed) when inserting; when the key is
 * already present the value is updated and `key` is freed. Cannot fail after a successful
 * strmap_reserve() for the new key count. */
int strmap_put_owned(strmap *m, char *key, uint32_t value, const char **key_out);
/* Updates the value of a present key; false when absent. Never allocates. */
bool strmap_set(strmap *m, const char *key, uint32_t value);
/* Removes key and frees the map's copy; false when absent. */
bool strmap_remove(strmap *m, const char *key);
/* Makes sure `count` keys fit without rehashing. Returns 0 or AFF_ENOMEM. */
int strmap_reserve(strmap *m, size_t count);

size_t strmap_count(const strmap *m);
/* Bytes held by the slot table and the keys. */
size_t strmap_memory(const strmap *m);

/* Calls fn(key, value, ctx) for every entry, in no particular order. */
void strmap_foreach(const strmap *m, void (*fn)(const char *key, uint32_t value, void *ctx),
                    void *ctx);

/* The 64-bit hash the map uses (exposed for tests). */
uint64_t strmap_hash(const char *key, size_t len);

#endif
