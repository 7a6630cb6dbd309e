/*
 * transport_codec.c: owns the conversion between protobuf-c messages and gRPC byte buffers,
 * and the one check every decoded message passes: each string field, at any depth (repeated
 * fields and map entries included), is valid UTF-8 without a NUL byte.
 *
 * Why the check reads the wire bytes rather than the decoded message: protobuf-c copies a
 * string field into a NUL-terminated char *, so "nul\0A" decodes to "nul" and nothing after
 * the unpacking can tell. The walker below follows the message descriptors over the raw
 * bytes, sees each string with its true length, and names the first bad field with its path
 * ("items[3].id"). Malformed wire data is left for protobuf_c_message_unpack to reject.
 */
#include "transport_codec.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

#define MAX_DEPTH 32 /* nesting deeper than this is refused (our messages nest 4 deep) */

grpc_byte_buffer *transport__pack(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* ---- string checks over the wire format ------------------------------------------------- */

enum { CHECK_OK = 0, CHECK_BAD = 1, CHECK_MALFORMED = 2 };

static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* Skips one field's value of wire type wt; false when the bytes end early or wt is a group
 * (protobuf-c rejects those when it decodes). Sets *data and *len for
 * length-delimited values. */
static bool skip_value(const uint8_t **p, const uint8_t *end, unsigned wt, const uint8_t **data,
                       size_t *len)
{
    uint64_t v;
    switch (wt) {
    case 0:
        return read_varint(p, end, &v);
    case 1:
        if (end - *p < 8) return false;
        *p += 8;
        return true;
    case 5:
        if (end - *p < 4) return false;
        *p += 4;
        return true;
    case 2:
        if (!read_varint(p, end, &v) || v > (uint64_t)(end - *p)) return false;
        *data = *p;
        *len = (size_t)v;
        *p += v;
        return true;
    default:
        return false;
    }
}

/* 0 when s[0..n) is valid UTF-8 without NUL; otherwise writes the problem into why. */
static int check_utf8(const uint8_t *s, size_t n, char *why, size_t size)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b == 0) {
            snprintf(why, size, "contains a NUL byte at offset %zu; strings may not contain NUL",
                     i);
            return CHECK_BAD;
        }
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint32_t cp, min;
        if ((b & 0xe0) == 0xc0) {
            need = 1, cp = b & 0x1f, min = 0x80;
        } else if ((b & 0xf0) == 0xe0) {
            need = 2, cp = b & 0x0f, min = 0x800;
        } else if ((b & 0xf8) == 0xf0) {
            need = 3, cp = b & 0x07, min = 0x10000;
        } else {
            goto bad;
        }
        if (n - i - 1 < need) goto bad;
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80) goto bad;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) goto bad;
        i += need + 1;
    }
    return CHECK_OK;
bad:
    snprintf(why, size,
             "is not valid UTF-8 (byte 0x%02x at offset %zu); proto3 strings must be UTF-8", s[i],
             i);
    return CHECK_BAD;
}

bool transport__wire_next(const uint8_t **p, const uint8_t *end, uint32_t *number, unsigned *wt,
                          const uint8_t **data, size_t *len)
{
    uint64_t key;
    *data = NULL;
    *len = 0;
    if (!read_varint(p, end, &key) || key >> 3 > UINT32_MAX) return false;
    *number = (uint32_t)(key >> 3);
    *wt = (unsigned)(key & 7);
    return skip_value(p, end, *wt, data, len);
}

/* How many times field `number` occurs in msg[0..n) before offset `before`: the index of a
 * repeated field's element, recomputed only when reporting an error. */
static size_t occurrence(const uint8_t *msg, size_t n, uint32_t number, const uint8_t *before)
{
    const uint8_t *p = msg, *end = msg + n;
    size_t count = 0;
    while (p < before) {
        uint64_t key;
        const uint8_t *data;
        size_t len;
        if (!read_varint(&p, end, &key) || !skip_value(&p, end, (unsigned)(key & 7), &data, &len))
            break;
        if ((uint32_t)(key >> 3) == number && p <= before) count++;
    }
    return count;
}

/* Prepends "name[index]." (or "name." for a singular field) to why. */
static void prepend_field(char *why, size_t size, const ProtobufCFieldDescriptor *f, size_t index,
                          bool leaf)
{
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", why);
    if (f->label == PROTOBUF_C_LABEL_REPEATED)
        snprintf(why, size, "%s[%zu]%s%s", f->name, index, leaf ? " " : ".", tmp);
    else
        snprintf(why, size, "%s%s%s", f->name, leaf ? " " : ".", tmp);
}

static int check_message(const ProtobufCMessageDescriptor *desc, const uint8_t *msg, size_t n,
                         int depth, char *why, size_t size)
{
    if (depth > MAX_DEPTH) {
        snprintf(why, size, "is nested more than %d messages deep", MAX_DEPTH);
        return CHECK_BAD;
    }
    const uint8_t *p = msg, *end = msg + n;
    while (p < end) {
        const uint8_t *field_start = p;
        uint64_t key;
        const uint8_t *data = NULL;
        size_t len = 0;
        if (!read_varint(&p, end, &key)) return CHECK_MALFORMED;
        unsigned wt = (unsigned)(key & 7);
        if (!skip_value(&p, end, wt, &data, &len)) return CHECK_MALFORMED;
        if (wt != 2 || key >> 3 > UINT32_MAX) continue;
        const ProtobufCFieldDescriptor *f =
            protobuf_c_message_descriptor_get_field(desc, (unsigned)(key >> 3));
        if (!f) continue; /* unknown field: kept as bytes, never read */
        int rc = CHECK_OK;
        bool leaf = true;
        if (f->type == PROTOBUF_C_TYPE_STRING) {
            rc = check_utf8(data, len, why, size);
        } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            rc = check_message(f->descriptor, data, len, depth + 1, why, size);
            leaf = false;
        }
        if (rc == CHECK_BAD)
            prepend_field(why, size, f, occurrence(msg, n, f->id, field_start), leaf);
        if (rc) return rc;
    }
    return CHECK_OK;
}

/* ---- decoding ------------------------------------------------------------------------------ */

ProtobufCMessage *transport__unpack_checked(grpc_byte_buffer *bb,
                                            const ProtobufCMessageDescriptor *desc, char *why,
                                            size_t why_size)
{
    char local[8];
    if (!why || !why_size) why = local, why_size = sizeof local;
    why[0] = '\0';
    if (!bb) return NULL;
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb)) return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    ProtobufCMessage *msg = NULL;
    const uint8_t *bytes = GRPC_SLICE_START_PTR(s);
    size_t n = GRPC_SLICE_LENGTH(s);
    if (check_message(desc, bytes, n, 0, why, why_size) != CHECK_BAD) {
        why[0] = '\0';
        msg = protobuf_c_message_unpack(desc, NULL, n, bytes);
    }
    grpc_slice_unref(s);
    return msg;
}

ProtobufCMessage *transport__unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc)
{
    return transport__unpack_checked(bb, desc, NULL, 0);
}
