/* strmap against a plain array reference under random puts, updates and removes. */
#include "strmap.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "affinity/affinity.h"

Test(strmap, put_get_update_remove)
{
    strmap *m;
    cr_assert_eq(strmap_create(&m, 0), AFF_OK);
    uint32_t v;
    cr_assert_not(strmap_get(m, "a", &v));
    const char *key;
    cr_assert_eq(strmap_put(m, "a", 1, &key), AFF_OK);
    cr_assert_str_eq(key, "a");
    cr_assert(strmap_get(m, "a", &v) && v == 1);
    cr_assert_eq(strmap_put(m, "a", 7, NULL), AFF_OK);
    cr_assert(strmap_get(m, "a", &v) && v == 7);
    cr_assert_eq(strmap_count(m), 1);
    cr_assert(strmap_set(m, "a", 9));
    cr_assert_not(strmap_set(m, "b", 9));
    cr_assert(strmap_remove(m, "a"));
    cr_assert_not(strmap_remove(m, "a"));
    cr_assert_eq(strmap_count(m), 0);
    strmap_destroy(m);
    strmap_destroy(NULL);
}

Test(strmap, random_operations_match_reference)
{
    unsigned seed = (unsigned)time(NULL);
    printf("strmap seed %u\n", seed);
    srand(seed);
    enum { KEYS = 3000 };
    static uint32_t ref[KEYS];
    static bool present[KEYS];
    strmap *m;
    cr_assert_eq(strmap_create(&m, 4), AFF_OK);
    char key[32];
    for (int step = 0; step < 60000; step++) {
        int k = rand() % KEYS;
        snprintf(key, sizeof key, "sku-%d", k);
        int op = rand() % 3;
        if (op < 2) {
            uint32_t v = (uint32_t)rand();
            cr_assert_eq(strmap_put(m, key, v, NULL), AFF_OK);
            ref[k] = v;
            present[k] = true;
        } else {
            cr_assert_eq(strmap_remove(m, key), present[k], "seed %u step %d", seed, step);
            present[k] = false;
        }
    }
    size_t n = 0;
    for (int k = 0; k < KEYS; k++) {
        snprintf(key, sizeof key, "sku-%d", k);
        uint32_t v;
        bool got = strmap_get(m, key, &v);
        cr_assert_eq(got, present[k], "seed %u key %d", seed, k);
        if (got) cr_assert_eq(v, ref[k]);
        n += present[k];
    }
    cr_assert_eq(strmap_count(m), n);
    strmap_destroy(m);
}

Test(strmap, keys_with_shared_prefixes_are_distinct)
{
    strmap *m;
    cr_assert_eq(strmap_create(&m, 0), AFF_OK);
    cr_assert_eq(strmap_put(m, "abc", 1, NULL), AFF_OK);
    cr_assert_eq(strmap_put(m, "abcd", 2, NULL), AFF_OK);
    cr_assert_eq(strmap_put(m, "ab", 3, NULL), AFF_OK);
    uint32_t v;
    cr_assert(strmap_get(m, "abc", &v) && v == 1);
    cr_assert(strmap_get(m, "abcd", &v) && v == 2);
    cr_assert(strmap_get(m, "ab", &v) && v == 3);
    cr_assert_not(strmap_get(m, "a", &v));
    strmap_destroy(m);
}
