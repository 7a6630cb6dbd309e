/* Compiles the public header as C, twice in one translation unit, and checks the tables it
 * generates. test_public_headers_again.c includes it in a second translation unit. */
#include "affinity/affinity.h"
#include "affinity/affinity.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

int aff_test_header_second_unit(void);

Test(public_headers, include_twice_in_two_units)
{
    cr_assert_eq(aff_test_header_second_unit(), AFF_VERSION_MAJOR * 10000 + AFF_VERSION_MINOR);
}

Test(public_headers, every_status_has_name_message_and_grpc_code)
{
#define CHECK(name, value, grpc, msg)                                                              \
    cr_assert_str_eq(aff_strerror(value), msg);                                                    \
    cr_assert_str_eq(aff_status_name(value), #name);                                               \
    cr_assert_eq(aff_status_grpc_code(value), grpc);                                               \
    cr_assert(value <= 0, "status codes are 0 or negative");
    AFF_STATUS_MAP(CHECK)
#undef CHECK
    cr_assert_str_eq(aff_strerror(12345), "unknown status");
    cr_assert_eq(aff_status_grpc_code(12345), 2);
}

Test(public_headers, version_string_matches_macros)
{
    cr_assert_str_eq(aff_version(), AFF_VERSION_STRING);
    char expect[32];
    snprintf(expect, sizeof expect, "%d.%d.%d", AFF_VERSION_MAJOR, AFF_VERSION_MINOR,
             AFF_VERSION_PATCH);
    cr_assert_str_eq(aff_version(), expect);
}
