/*
 * affinity.h: the public C API of Affinity — status codes, limits and version.
 *
 * Every function in Affinity that can fail returns int: 0 (AFF_OK) on success or one of the
 * negative codes below. The codes are listed once, in AFF_STATUS_MAP, which also generates
 * aff_strerror() and aff_status_name(). This header is plain C11 and safe to include twice.
 */
#ifndef AFFINITY_AFFINITY_H
#define AFFINITY_AFFINITY_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define AFF_EXPORT __declspec(dllexport)
#elif defined(__GNUC__)
#define AFF_EXPORT __attribute__((visibility("default")))
#else
#define AFF_EXPORT
#endif

#define AFF_VERSION_MAJOR  0
#define AFF_VERSION_MINOR  1
#define AFF_VERSION_PATCH  0
#define AFF_VERSION_STRING "0.1.0"

/* Limits shared by the engine, the server and the clients. */
#define AFF_MAX_DIM               4096 /* vector dimension: 1..AFF_MAX_DIM */
#define AFF_MAX_K                 1024 /* results per query: 1..AFF_MAX_K */
#define AFF_MAX_ID_LEN            128  /* item and user ids: 1..AFF_MAX_ID_LEN bytes */
#define AFF_MAX_NAME_LEN          64   /* collection names: [A-Za-z0-9_.-], 1..64 bytes */
#define AFF_MAX_TAGS_PER_ITEM     16   /* tags on one item */
#define AFF_MAX_ATTR_LEN          128  /* a category or tag string */
#define AFF_MAX_RERANK_CANDIDATES 1000

/*
 * X(name, value, gRPC status code, message). The gRPC code column lets the transport map
 * statuses without a second table; it is a plain integer so this header needs no gRPC.
 */
#define AFF_STATUS_MAP(X)                                                                          \
    X(OK, 0, 0, "ok")                                                                              \
    X(EINVAL, -1, 3, "invalid argument")                                                           \
    X(ENOTFOUND, -2, 5, "not found")                                                               \
    X(EEXIST, -3, 6, "already exists")                                                             \
    X(ENOMEM, -4, 8, "out of memory")                                                              \
    X(EFULL, -5, 8, "resource exhausted")                                                          \
    X(EDEADLINE, -6, 4, "deadline exceeded")                                                       \
    X(EUNAVAILABLE, -7, 14, "unavailable")                                                         \
    X(EUNAUTHENTICATED, -8, 16, "unauthenticated")                                                 \
    X(EDEVICE, -9, 13, "device error")                                                             \
    X(EIO, -10, 13, "I/O error")                                                                   \
    X(EUNSUPPORTED, -11, 12, "not supported")                                                      \
    X(ECANCELLED, -12, 1, "cancelled")                                                             \
    X(EINTERNAL, -13, 13, "internal error")                                                        \
    X(EPRECONDITION, -14, 9, "failed precondition")

typedef enum aff_status {
#define AFF__STATUS_ENUM(name, value, grpc, msg) AFF_##name = (value),
    AFF_STATUS_MAP(AFF__STATUS_ENUM)
#undef AFF__STATUS_ENUM
} aff_status;

/* A static, human-readable description of a status code ("unknown status" if not listed). */
AFF_EXPORT const char *aff_strerror(int status);
/* The code's name without prefix, e.g. "EINVAL". */
AFF_EXPORT const char *aff_status_name(int status);
/* The gRPC status code (grpc_status_code value) a status maps to. */
AFF_EXPORT int aff_status_grpc_code(int status);
/* The library version, "MAJOR.MINOR.PATCH". */
AFF_EXPORT const char *aff_version(void);

#ifdef __cplusplus
}
#endif

#endif /* AFFINITY_AFFINITY_H */
