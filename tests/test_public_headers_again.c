/* The second translation unit for test_public_headers.c: the header must not define
 * anything that clashes at link time. */
#include "affinity/affinity.h"
#include "affinity/affinity.h"

int aff_test_header_second_unit(void);

int aff_test_header_second_unit(void)
{
    return AFF_VERSION_MAJOR * 10000 + AFF_VERSION_MINOR;
}
