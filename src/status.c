/*
 * status.c: owns the tables generated from AFF_STATUS_MAP and the error-detail helper.
 */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>

const char *aff_strerror(int status)
{
    switch (status) {
#define AFF__STATUS_MSG(name, value, grpc, msg)                                                    \
    case value:                                                                                    \
        return msg;
        AFF_STATUS_MAP(AFF__STATUS_MSG)
#undef AFF__STATUS_MSG
    }
    return "unknown status";
}

const char *aff_status_name(int status)
{
    switch (status) {
#define AFF__STATUS_NAME(name, value, grpc, msg)                                                   \
    case value:                                                                                    \
        return #name;
        AFF_STATUS_MAP(AFF__STATUS_NAME)
#undef AFF__STATUS_NAME
    }
    return "UNKNOWN";
}

int aff_status_grpc_code(int status)
{
    switch (status) {
#define AFF__STATUS_GRPC(name, value, grpc, msg)                                                   \
    case value:                                                                                    \
        return grpc;
        AFF_STATUS_MAP(AFF__STATUS_GRPC)
#undef AFF__STATUS_GRPC
    }
    return 2; /* UNKNOWN */
}

const char *aff_version(void)
{
    return AFF_VERSION_STRING;
}

int aff__fail(aff_err *err, int code, const char *fmt, ...)
{
    if (err) {
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void aff__err_clear(aff_err *err)
{
    if (err) {
        err->code = AFF_OK;
        err->msg[0] = '\0';
    }
}
