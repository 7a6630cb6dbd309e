/*
 * transport_reflection.h: gRPC server reflection (grpc.reflection.v1 and v1alpha
 * ServerReflection/ServerReflectionInfo), serving the descriptors of the real .proto files,
 * embedded at build time (proto/embed_descriptors.cmake). Only transport*.c include this.
 */
#ifndef AFFINITY_TRANSPORT_REFLECTION_H
#define AFFINITY_TRANSPORT_REFLECTION_H

#include <stddef.h>

#include "transport_internal.h"

#define TRANSPORT_REFLECTION_V1 "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
#define TRANSPORT_REFLECTION_V1ALPHA                                                               \
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

/* The serialized google.protobuf.FileDescriptorSet of every served file and its imports
 * (generated: gen/descriptor_set.c). */
extern const unsigned char transport__descriptor_set[];
extern const size_t transport__descriptor_set_len;

/* Starts a ServerReflectionInfo stream (either version: the messages are the same). */
void transport__reflection_info(tcall *c);

#endif
