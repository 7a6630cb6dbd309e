/*
 * strmap.c: owns the slot table and the key strings of each map (see strmap.h).
 */
#include "strmap.h"

#include <stdlib.h>
#include <string.h>

#include "affinity/affinity.h"

typedef struct slot {
    uint64_t hash; /* 0 marks an empty slot; real hashes are forced non-zero */
    char *key;
    uint32_t value;
} slot;

struct strmap {
    slot *slots;
    size_t mask; /* capacity - 1, capacity a power of two */
    size_t count;
    size_t key_bytes;
};

uint64_t strmap_hash(const char *key, size_t len)
{
    /* FNV-1a over 8-byte words with a final avalanche (splitmix64): fast on short ids. */
    uint64_t h = 0xcbf29ce484222325ull ^ (uint64_t)len;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, key + i, 8);
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 29;
    }
    for (; i < len; i++)
        h = (h ^ (unsigned char)key[i]) * 0x100000001b3ull;
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h ? h : 1;
}

static size_t capacity_for(size_t count)
{
    size_t cap = 16;
    while (cap * 3 / 4 < count + 1)
        cap *= 2;
    return cap;
}

int strmap_create(strmap **out, size_t expected)
{
    *out = NULL;
    strmap *m = calloc(1, sizeof *m);
    if (!m) return AFF_ENOMEM;
    size_t cap = capacity_for(expected);
    m->slots = calloc(cap, sizeof *m->slots);
    if (!m->slots) {
        free(m);
        return AFF_ENOMEM;
    }
    m->mask = cap - 1;
    *out = m;
    return AFF_OK;
}

void strmap_destroy(strmap *m)
{
    if (!m) return;
    for (size_t i = 0; i <= m->mask; i++)
        free(m->slots[i].key);
    free(m->slots);
    free(m);
}

/* Index of key's slot, or of the empty slot where it would go. */
static size_t find_slot(const strmap *m, const char *key, size_t len, uint64_t h)
{
    size_t i = h & m->mask;
    for (;;) {
        const slot *s = &m->slots[i];
        if (s->hash == 0) return i;
        if (s->hash == h && strncmp(s->key, key, len) == 0 && s->key[len] == '\0') return i;
        i = (i + 1) & m->mask;
    }
}

static int rehash(strmap *m, size_t new_cap)
{
    slot *fresh = calloc(new_cap, sizeof *fresh);
    if (!fresh) return AFF_ENOMEM;
    size_t mask = new_cap - 1;
    for (size_t i = 0; i <= m->mask; i++) {
        slot s = m->slots[i];
        if (s.hash == 0) continue;
        size_t j = s.hash & mask;
        while (fresh[j].hash != 0)
            j = (j + 1) & mask;
        fresh[j] = s;
    }
    free(m->slots);
    m->slots = fresh;
    m->mask = mask;
    return AFF_OK;
}

int strmap_reserve(strmap *m, size_t count)
{
    size_t cap = capacity_for(count);
    if (cap <= m->mask + 1) return AFF_OK;
    return rehash(m, cap);
}

bool strmap_get(const strmap *m, const char *key, uint32_t *value)
{
    size_t len = strlen(key);
    const slot *s = &m->slots[find_slot(m, key, len, strmap_hash(key, len))];
    if (s->hash == 0) return false;
    if (value) *value = s->value;
    return true;
}

bool strmap_set(strmap *m, const char *key, uint32_t value)
{
    size_t len = strlen(key);
    slot *s = &m->slots[find_slot(m, key, len, strmap_hash(key, len))];
    if (s->hash == 0) return false;
    s->value = value;
    return true;
}

int strmap_put_owned(strmap *m, char *key, uint32_t value, const char **key_out)
{
    size_t len = strlen(key);
    uint64_t h = strmap_hash(key, len);
    slot *s = &m->slots[find_slot(m, key, len, h)];
    if (s->hash != 0) {
        s->value = value;
        free(key);
        if (key_out) *key_out = s->key;
        return AFF_OK;
    }
    if (m->count + 1 > (m->mask + 1) * 3 / 4) {
        if (rehash(m, (m->mask + 1) * 2) != AFF_OK) return AFF_ENOMEM;
        s = &m->slots[find_slot(m, key, len, h)];
    }
    s->hash = h;
    s->key = key;
    s->value = value;
    m->count++;
    m->key_bytes += len + 1;
    if (key_out) *key_out = key;
    return AFF_OK;
}

int strmap_put(strmap *m, const char *key, uint32_t value, const char **key_out)
{
    if (strmap_set(m, key, value)) {
        if (key_out) {
            size_t len = strlen(key);
            *key_out = m->slots[find_slot(m, key, len, strmap_hash(key, len))].key;
        }
        return AFF_OK;
    }
    char *copy = strdup(key);
    if (!copy) return AFF_ENOMEM;
    int rc = strmap_put_owned(m, copy, value, key_out);
    if (rc != AFF_OK) free(copy);
    return rc;
}

bool strmap_remove(strmap *m, const char *key)
{
    size_t len = strlen(key);
    size_t i = find_slot(m, key, len, strmap_hash(key, len));
    if (m->slots[i].hash == 0) return false;
    free(m->slots[i].key);
    m->key_bytes -= len + 1;
    m->count--;
    /* Backward-shift: pull later entries of the probe run into the hole. */
    size_t hole = i;
    size_t j = (i + 1) & m->mask;
    while (m->slots[j].hash != 0) {
        size_t home = m->slots[j].hash & m->mask;
        /* Move j into the hole unless its home lies cyclically in (hole, j]. */
        bool stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            m->slots[hole] = m->slots[j];
            hole = j;
        }
        j = (j + 1) & m->mask;
    }
    m->slots[hole] = (slot){0};
    return true;
}

size_t strmap_count(const strmap *m)
{
    return m->count;
}

size_t strmap_memory(const strmap *m)
{
    return (m->mask + 1) * sizeof(slot) + m->key_bytes + sizeof *m;
}

void strmap_foreach(const strmap *m, void (*fn)(const char *key, uint32_t value, void *ctx),
                    void *ctx)
{
    for (size_t i = 0; i <= m->mask; i++)
        if (m->slots[i].hash != 0) fn(m->slots[i].key, m->slots[i].value, ctx);
}
