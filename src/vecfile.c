/*
 * vecfile.c: owns the .npy and .fvecs parsers and writers of vecfile.h. Rows are read with
 * stdio in caller-sized chunks; only little-endian hosts are supported (as NumPy's '<f4').
 */
#include "vecfile.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct vecfile_reader {
    FILE *f;
    char path[512];
    vecfile_format format;
    uint64_t rows;
    uint64_t next_row;
    uint32_t dim;
};

int vecfile_format_of(const char *path, vecfile_format *out, aff_err *err)
{
    const char *dot = strrchr(path, '.');
    if (dot && strcmp(dot, ".npy") == 0) {
        *out = VECFILE_NPY;
        return AFF_OK;
    }
    if (dot && strcmp(dot, ".fvecs") == 0) {
        *out = VECFILE_FVECS;
        return AFF_OK;
    }
    return aff__fail(err, AFF_EINVAL, "%s: unknown vector file type; use .npy or .fvecs", path);
}

/* Finds `'key':` in a NumPy header dict and returns a pointer just past the colon. */
static const char *npy_find_key(const char *hdr, const char *key)
{
    char pat[32];
    snprintf(pat, sizeof(pat), "'%s'", key);
    const char *p = strstr(hdr, pat);
    if (!p) return NULL;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    if (*p != ':') return NULL;
    p++;
    while (*p == ' ')
        p++;
    return p;
}

static int npy_parse_header(vecfile_reader *r, const char *hdr, aff_err *err)
{
    const char *p = npy_find_key(hdr, "descr");
    if (!p || *p != '\'')
        return aff__fail(err, AFF_EINVAL, "%s: .npy header has no 'descr'", r->path);
    char descr[16] = {0};
    size_t i = 0;
    for (p++; *p && *p != '\'' && i < sizeof(descr) - 1; p++)
        descr[i++] = *p;
    if (strcmp(descr, "<f4") != 0 && strcmp(descr, "=f4") != 0)
        return aff__fail(err, AFF_EINVAL,
                         "%s: dtype '%s' is not supported; float32 little-endian ('<f4') is "
                         "required (numpy: arr.astype('<f4'))",
                         r->path, descr);
    p = npy_find_key(hdr, "fortran_order");
    if (!p) return aff__fail(err, AFF_EINVAL, "%s: .npy header has no 'fortran_order'", r->path);
    if (strncmp(p, "False", 5) != 0)
        return aff__fail(err, AFF_EINVAL,
                         "%s: Fortran-order arrays are not supported; C order is required "
                         "(numpy: np.ascontiguousarray(arr))",
                         r->path);
    p = npy_find_key(hdr, "shape");
    if (!p || *p != '(')
        return aff__fail(err, AFF_EINVAL, "%s: .npy header has no 'shape'", r->path);
    p++;
    unsigned long long dims[3];
    int nd = 0;
    while (*p && *p != ')') {
        while (*p == ' ' || *p == ',')
            p++;
        if (*p == ')') break;
        if (!isdigit((unsigned char)*p) || nd == 3)
            return aff__fail(err, AFF_EINVAL, "%s: malformed .npy shape", r->path);
        char *end;
        errno = 0;
        dims[nd++] = strtoull(p, &end, 10);
        if (errno) return aff__fail(err, AFF_EINVAL, "%s: malformed .npy shape", r->path);
        p = end;
        while (*p == 'L' || *p == ' ')
            p++;
    }
    if (nd != 2)
        return aff__fail(err, AFF_EINVAL,
                         "%s: the array has %d dimensions; a 2-D array (rows, dim) is required",
                         r->path, nd);
    if (dims[1] < 1 || dims[1] > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL, "%s: dimension %llu is outside 1..%d", r->path, dims[1],
                         AFF_MAX_DIM);
    r->rows = dims[0];
    r->dim = (uint32_t)dims[1];
    return AFF_OK;
}

static int npy_open(vecfile_reader *r, uint64_t file_size, aff_err *err)
{
    unsigned char pre[10];
    if (fread(pre, 1, 8, r->f) != 8 || memcmp(pre, "\x93NUMPY", 6) != 0)
        return aff__fail(err, AFF_EINVAL, "%s: not a .npy file (bad magic)", r->path);
    uint32_t hlen;
    uint64_t start;
    if (pre[6] == 1) {
        if (fread(pre + 8, 1, 2, r->f) != 2)
            return aff__fail(err, AFF_EINVAL, "%s: truncated .npy header", r->path);
        hlen = (uint32_t)pre[8] | ((uint32_t)pre[9] << 8);
        start = 10;
    } else if (pre[6] == 2 || pre[6] == 3) {
        unsigned char l4[4];
        if (fread(l4, 1, 4, r->f) != 4)
            return aff__fail(err, AFF_EINVAL, "%s: truncated .npy header", r->path);
        hlen = (uint32_t)l4[0] | ((uint32_t)l4[1] << 8) | ((uint32_t)l4[2] << 16) |
               ((uint32_t)l4[3] << 24);
        start = 12;
    } else {
        return aff__fail(err, AFF_EINVAL, "%s: .npy version %d is not supported", r->path, pre[6]);
    }
    if (hlen > 1u << 20) return aff__fail(err, AFF_EINVAL, "%s: .npy header too long", r->path);
    char *hdr = malloc(hlen + 1);
    if (!hdr) return aff__fail(err, AFF_ENOMEM, "out of memory");
    int rc = AFF_OK;
    if (fread(hdr, 1, hlen, r->f) != hlen) {
        rc = aff__fail(err, AFF_EINVAL, "%s: truncated .npy header", r->path);
        goto out;
    }
    hdr[hlen] = '\0';
    rc = npy_parse_header(r, hdr, err);
    if (rc) goto out;
    uint64_t need = start + hlen + r->rows * r->dim * sizeof(float);
    if (file_size < need)
        rc = aff__fail(err, AFF_EINVAL,
                       "%s: truncated: the header says %llu x %u floats but the file has %llu "
                       "bytes (%llu needed)",
                       r->path, (unsigned long long)r->rows, r->dim, (unsigned long long)file_size,
                       (unsigned long long)need);
out:
    free(hdr);
    return rc;
}

static int fvecs_open(vecfile_reader *r, uint64_t file_size, aff_err *err)
{
    if (file_size == 0) {
        r->rows = 0;
        r->dim = 0;
        return AFF_OK;
    }
    int32_t d;
    if (fread(&d, sizeof(d), 1, r->f) != 1)
        return aff__fail(err, AFF_EINVAL, "%s: truncated .fvecs file", r->path);
    if (d < 1 || d > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL,
                         "%s: first row has dimension %d; 1..%d is allowed (is this .fvecs?)",
                         r->path, d, AFF_MAX_DIM);
    uint64_t row_bytes = 4 + (uint64_t)d * 4;
    if (file_size % row_bytes != 0)
        return aff__fail(err, AFF_EINVAL,
                         "%s: size %llu is not a multiple of the row size %llu (dimension %d): "
                         "truncated, or rows of different dimensions",
                         r->path, (unsigned long long)file_size, (unsigned long long)row_bytes, d);
    r->dim = (uint32_t)d;
    r->rows = file_size / row_bytes;
    if (fseek(r->f, 0, SEEK_SET) != 0)
        return aff__fail(err, AFF_EIO, "%s: seek failed: %s", r->path, strerror(errno));
    return AFF_OK;
}

int vecfile_open(vecfile_reader **out, const char *path, aff_err *err)
{
    *out = NULL;
    vecfile_format fmt;
    int rc = vecfile_format_of(path, &fmt, err);
    if (rc) return rc;
    vecfile_reader *r = calloc(1, sizeof(*r));
    if (!r) return aff__fail(err, AFF_ENOMEM, "out of memory");
    snprintf(r->path, sizeof(r->path), "%s", path);
    r->format = fmt;
    r->f = fopen(path, "rb");
    if (!r->f) {
        rc = aff__fail(err, AFF_EIO, "%s: cannot open: %s", path, strerror(errno));
        goto out;
    }
    struct stat st;
    if (fstat(fileno(r->f), &st) != 0) {
        rc = aff__fail(err, AFF_EIO, "%s: cannot stat: %s", path, strerror(errno));
        goto out;
    }
    rc = fmt == VECFILE_NPY ? npy_open(r, (uint64_t)st.st_size, err)
                            : fvecs_open(r, (uint64_t)st.st_size, err);
out:
    if (rc) {
        vecfile_close(r);
        return rc;
    }
    *out = r;
    return AFF_OK;
}

void vecfile_close(vecfile_reader *r)
{
    if (!r) return;
    if (r->f) fclose(r->f);
    free(r);
}

uint64_t vecfile_rows(const vecfile_reader *r)
{
    return r->rows;
}

uint32_t vecfile_dim(const vecfile_reader *r)
{
    return r->dim;
}

int vecfile_read(vecfile_reader *r, float *buf, size_t max_rows, size_t *n_read, aff_err *err)
{
    *n_read = 0;
    uint64_t left = r->rows - r->next_row;
    size_t n = left < max_rows ? (size_t)left : max_rows;
    if (n == 0) return AFF_OK;
    if (r->format == VECFILE_NPY) {
        if (fread(buf, sizeof(float) * r->dim, n, r->f) != n)
            return aff__fail(err, AFF_EIO, "%s: read failed at row %llu", r->path,
                             (unsigned long long)r->next_row);
    } else {
        for (size_t i = 0; i < n; i++) {
            int32_t d;
            if (fread(&d, sizeof(d), 1, r->f) != 1 ||
                fread(buf + i * r->dim, sizeof(float), r->dim, r->f) != r->dim)
                return aff__fail(err, AFF_EIO, "%s: read failed at row %llu", r->path,
                                 (unsigned long long)(r->next_row + i));
            if ((uint32_t)d != r->dim)
                return aff__fail(err, AFF_EINVAL,
                                 "%s: row %llu has dimension %d but the first row has %u; "
                                 "all rows must have the same dimension",
                                 r->path, (unsigned long long)(r->next_row + i), d, r->dim);
        }
    }
    r->next_row += n;
    *n_read = n;
    return AFF_OK;
}

int vecfile_load(const char *path, float **data, uint64_t *rows, uint32_t *dim, aff_err *err)
{
    *data = NULL;
    vecfile_reader *r = NULL;
    float *buf = NULL;
    int rc = vecfile_open(&r, path, err);
    if (rc) goto out;
    size_t total = (size_t)(r->rows * r->dim);
    buf = malloc(total ? total * sizeof(float) : 1);
    if (!buf) {
        rc = aff__fail(err, AFF_ENOMEM, "%s: out of memory for %llu x %u floats", path,
                       (unsigned long long)r->rows, r->dim);
        goto out;
    }
    size_t got;
    rc = vecfile_read(r, buf, (size_t)r->rows, &got, err);
    if (rc) goto out;
    *rows = r->rows;
    *dim = r->dim;
    *data = buf;
    buf = NULL;
out:
    free(buf);
    vecfile_close(r);
    return rc;
}

static int write_npy(FILE *f, const float *data, uint64_t rows, uint32_t dim)
{
    char hdr[128];
    int n = snprintf(hdr, sizeof(hdr),
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (%llu, %u), }",
                     (unsigned long long)rows, dim);
    /* Pad so that magic + version + length + header is a multiple of 64, ending in '\n'. */
    size_t total = 10 + (size_t)n + 1;
    size_t pad = (64 - total % 64) % 64;
    memset(hdr + n, ' ', pad);
    hdr[n + pad] = '\n';
    uint16_t hlen = (uint16_t)(n + pad + 1);
    unsigned char pre[10] = {0x93,
                             'N',
                             'U',
                             'M',
                             'P',
                             'Y',
                             1,
                             0,
                             (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    if (fwrite(pre, 1, 10, f) != 10 || fwrite(hdr, 1, hlen, f) != hlen) return -1;
    if (rows && fwrite(data, sizeof(float) * dim, rows, f) != rows) return -1;
    return 0;
}

static int write_fvecs(FILE *f, const float *data, uint64_t rows, uint32_t dim)
{
    int32_t d = (int32_t)dim;
    for (uint64_t i = 0; i < rows; i++)
        if (fwrite(&d, sizeof(d), 1, f) != 1 ||
            fwrite(data + i * dim, sizeof(float), dim, f) != dim)
            return -1;
    return 0;
}

int vecfile_write(const char *path, const float *data, uint64_t rows, uint32_t dim, aff_err *err)
{
    vecfile_format fmt;
    int rc = vecfile_format_of(path, &fmt, err);
    if (rc) return rc;
    if (dim < 1 || dim > AFF_MAX_DIM)
        return aff__fail(err, AFF_EINVAL, "dimension %u is outside 1..%d", dim, AFF_MAX_DIM);
    FILE *f = fopen(path, "wb");
    if (!f) return aff__fail(err, AFF_EIO, "%s: cannot create: %s", path, strerror(errno));
    int w = fmt == VECFILE_NPY ? write_npy(f, data, rows, dim) : write_fvecs(f, data, rows, dim);
    if (fclose(f) != 0 || w != 0)
        return aff__fail(err, AFF_EIO, "%s: write failed: %s", path, strerror(errno));
    return AFF_OK;
}
