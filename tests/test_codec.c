/*
 * test_codec.c: the transport's string check (transport_codec.c): every string field at any
 * depth must be valid UTF-8 without NUL, and the error names the field path. Messages are
 * packed with protobuf-c, then the placeholder bytes are patched on the wire (same length),
 * as a hostile client would send them.
 */
#include <criterion/criterion.h>
#include <grpc/grpc.h>
#include <string.h>

#include "affinity/v1/affinity.pb-c.h"
#include "transport_codec.h"

/* Packs msg, replaces the unique placeholder `from` with `to` (same length), and unpacks it
 * with the check; returns the message (or NULL) and the reason in why. */
static ProtobufCMessage *roundtrip(const ProtobufCMessage *msg, const char *from, const char *to,
                                   size_t len, char *why, size_t size)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n);
    protobuf_c_message_pack(msg, buf);
    if (from) {
        uint8_t *hit = memmem(buf, n, from, len);
        cr_assert_not_null(hit, "placeholder %s not found", from);
        cr_assert_null(memmem(hit + 1, n - (size_t)(hit - buf) - 1, from, len), "not unique");
        memcpy(hit, to, len);
    }
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    free(buf);
    ProtobufCMessage *out = transport__unpack_checked(bb, msg->descriptor, why, size);
    grpc_byte_buffer_destroy(bb);
    return out;
}

static void init(void)
{
    grpc_init();
}

static void fini(void)
{
    grpc_shutdown();
}

TestSuite(codec, .init = init, .fini = fini);

/* An UpsertItemsRequest with items[0..2]; item 2's tag 1 is the placeholder. */
static char *ids[3] = {"i0", "i1", "XXXXi2"};

static void check_tag(const char *bytes, size_t len, bool ok, const char *want)
{
    Affinity__V1__Item items[3], *ptrs[3];
    char *tags[2] = {"t0", "TTTT"};
    for (int i = 0; i < 3; i++) {
        affinity__v1__item__init(&items[i]);
        items[i].id = ids[i];
        ptrs[i] = &items[i];
    }
    items[2].n_tags = 2;
    items[2].tags = tags;
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = "c";
    req.n_items = 3;
    req.items = ptrs;
    char why[400];
    cr_assert_eq(len, 4);
    ProtobufCMessage *m = roundtrip(&req.base, "TTTT", bytes, 4, why, sizeof why);
    if (ok) {
        cr_assert_not_null(m, "rejected: %s", why);
        protobuf_c_message_free_unpacked(m, NULL);
    } else {
        cr_assert_null(m);
        cr_assert(strstr(why, "items[2].tags[1]"), "%s", why);
        cr_assert(strstr(why, want), "%s", why);
    }
}

Test(codec, utf8_rules_at_depth)
{
    check_tag("abcd", 4, true, "");
    check_tag("\xc3\xa4\xc3\xb6", 4, true, "");       /* äö */
    check_tag("\xf0\x9f\xa7\x80", 4, true, "");       /* U+1F9C0, 4 bytes */
    check_tag("\xf4\x8f\xbf\xbf", 4, true, "");       /* U+10FFFF, the last code point */
    check_tag("ab\xff\xfe", 4, false, "UTF-8");       /* not UTF-8 at all */
    check_tag("a\xc0\x80z", 4, false, "UTF-8");       /* overlong NUL */
    check_tag("\xe0\x80\xafz", 4, false, "UTF-8");    /* overlong '/' */
    check_tag("\xed\xa0\x80z", 4, false, "UTF-8");    /* UTF-16 surrogate */
    check_tag("\xf4\x90\x80\x80", 4, false, "UTF-8"); /* beyond U+10FFFF */
    check_tag("abc\xe2", 4, false, "UTF-8");          /* truncated sequence */
    check_tag("a\x80zz", 4, false, "UTF-8");          /* lone continuation byte */
    check_tag("ab\0c", 4, false, "NUL");              /* embedded NUL */
}

Test(codec, nul_in_an_id_and_the_first_bad_field_is_named)
{
    Affinity__V1__Item items[2], *ptrs[2];
    char *names[2] = {"nulXA", "nulYB"};
    for (int i = 0; i < 2; i++) {
        affinity__v1__item__init(&items[i]);
        items[i].id = names[i];
        ptrs[i] = &items[i];
    }
    Affinity__V1__UpsertItemsRequest req = AFFINITY__V1__UPSERT_ITEMS_REQUEST__INIT;
    req.collection = "c";
    req.n_items = 2;
    req.items = ptrs;
    char why[400];
    cr_assert_null(roundtrip(&req.base, "nulYB", "nul\0B", 5, why, sizeof why));
    cr_assert(strstr(why, "items[1].id contains a NUL byte at offset 3"), "%s", why);
}

Test(codec, map_entries_and_malformed_bytes)
{
    Affinity__V1__Event__ContextEntry kv = AFFINITY__V1__EVENT__CONTEXT_ENTRY__INIT, *kvp = &kv;
    kv.key = "KKK";
    kv.value = "v";
    Affinity__V1__Event ev = AFFINITY__V1__EVENT__INIT, *evp = &ev;
    ev.item_id = "x";
    ev.n_context = 1;
    ev.context = &kvp;
    Affinity__V1__PutEventsRequest req = AFFINITY__V1__PUT_EVENTS_REQUEST__INIT;
    req.collection = "c";
    req.user_id = "u";
    req.n_events = 1;
    req.events = &evp;
    char why[400];
    cr_assert_null(roundtrip(&req.base, "KKK", "K\xffK", 3, why, sizeof why));
    cr_assert(strstr(why, "events[0].context[0].key"), "%s", why);
    /* Bytes that are not a message at all: NULL with no reason (the caller says "not a
     * valid message"). */
    grpc_slice s = grpc_slice_from_copied_buffer("\x0a\xff\xff", 3);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    cr_assert_null(transport__unpack_checked(bb, &affinity__v1__put_events_request__descriptor, why,
                                             sizeof why));
    cr_assert_str_eq(why, "");
    grpc_byte_buffer_destroy(bb);
}
