/*
 * vecfile.h: reads and writes files of float32 vectors: NumPy `.npy` (2-D, float32,
 * C order, little-endian) and `.fvecs` (each row: int32 dimension, then that many float32).
 *
 * A reader streams rows in chunks so a catalog larger than memory can be loaded. The format is
 * chosen by the file name's extension. Errors are AFF_EIO (cannot open or read) or AFF_EINVAL
 * (not a file of this format, wrong dtype, rows of different dimensions, truncated), with the
 * detail in err. Readers and writers are owned by one thread at a time.
 */
#ifndef AFFINITY_VECFILE_H
#define AFFINITY_VECFILE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef enum vecfile_format {
    VECFILE_NPY = 1,
    VECFILE_FVECS = 2,
} vecfile_format;

typedef struct vecfile_reader vecfile_reader;

/* The format a path names by its extension (".npy" or ".fvecs"); AFF_EINVAL otherwise. */
int vecfile_format_of(const char *path, vecfile_format *out, aff_err *err);

/* Opens path and reads its header. For .fvecs the row count comes from the file size and
 * the first row's dimension. */
int vecfile_open(vecfile_reader **out, const char *path, aff_err *err);
void vecfile_close(vecfile_reader *r);
uint64_t vecfile_rows(const vecfile_reader *r);
uint32_t vecfile_dim(const vecfile_reader *r);

/* Reads up to max_rows next rows into buf (max_rows * dim floats); *n_read is 0 at the end.
 * A row whose values are not finite is returned as is (the server rejects it). */
int vecfile_read(vecfile_reader *r, float *buf, size_t max_rows, size_t *n_read, aff_err *err);

/* Reads a whole file into a malloc'ed array (*data, rows * dim floats; the caller frees). */
int vecfile_load(const char *path, float **data, uint64_t *rows, uint32_t *dim, aff_err *err);

/* Writes rows x dim floats (row-major) to path in the format its extension names. */
int vecfile_write(const char *path, const float *data, uint64_t rows, uint32_t dim, aff_err *err);

#endif
