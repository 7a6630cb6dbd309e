/*
 * transport_codec.h: protobuf-c messages to and from gRPC byte buffers, shared by the server
 * (transport.c) and the client (transport_client.c). Only transport*.c include this header.
 */
#ifndef AFFINITY_TRANSPORT_CODEC_H
#define AFFINITY_TRANSPORT_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>
#include <protobuf-c/protobuf-c.h>

/* A new byte buffer holding msg serialized; NULL when out of memory. Caller destroys it. */
grpc_byte_buffer *transport__pack(const ProtobufCMessage *msg);
/* Decodes bb with desc; NULL when bb is NULL, the bytes are not a valid message, or a string
 * field at any depth is not valid UTF-8 or holds a NUL byte. In that last case why (may be
 * NULL) receives the field path and the problem, e.g. "items[3].id is not valid UTF-8 (...)";
 * otherwise why is "". The result is freed with protobuf_c_message_free_unpacked(msg, NULL).
 * bb is borrowed. */
ProtobufCMessage *transport__unpack_checked(grpc_byte_buffer *bb,
                                            const ProtobufCMessageDescriptor *desc, char *why,
                                            size_t why_size);
/* transport__unpack_checked without the reason. */
ProtobufCMessage *transport__unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc);

/* Reads the next field of serialized protobuf bytes at *p (advanced past it): its number,
 * wire type and, for a length-delimited field (wire type 2), its bytes in *data and *len. false
 * when the bytes are malformed or hold a group. */
bool transport__wire_next(const uint8_t **p, const uint8_t *end, uint32_t *number, unsigned *wt,
                          const uint8_t **data, size_t *len);

#endif
