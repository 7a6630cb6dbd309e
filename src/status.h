/*
 * status.h: the error detail that travels with a negative aff_status.
 *
 * Functions that can fail take an `aff_err *err` as their last parameter (NULL allowed) and
 * return the same code they store in it. The message says what was wrong and what is allowed;
 * the transport sends it as the gRPC status message.
 */
#ifndef AFFINITY_STATUS_H
#define AFFINITY_STATUS_H

#include "affinity/affinity.h"

typedef struct aff_err {
    int code;
    char msg[256];
} aff_err;

/* Records code and a printf-style message in err (if not NULL) and returns code. */
int aff__fail(aff_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Resets err to AFF_OK with an empty message. */
void aff__err_clear(aff_err *err);

#endif
