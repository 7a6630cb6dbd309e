/*
 * cpu_score.c: the reduced-precision scan of the CPU backend (cpu_score.h): encoding rows to
 * bf16 or int8 with their error bounds, the scan kernels (portable C, AVX2, AVX-512) and the
 * search that keeps the provable candidates and re-ranks them in fp32.
 *
 * Rules kept here: every candidate bound is computed from measured rounding errors (see the
 * rule in cpu_score.h), and a stale threshold is only ever lower than the true one, so a kernel
 * may report more rows than needed, never fewer. The kernels agree with the portable C ones up
 * to float rounding, which the bounds' slack covers; tests compare each one with a plain sort.
 */
#include "cpu_score.h"

#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "topk.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_SCORE_X86 1
#endif

/* ---- names and dispatch ------------------------------------------------------------- */

const char *cpu_isa_name(backend_cpu_isa isa)
{
    switch (isa) {
    case BACKEND_CPU_ISA_SCALAR:
        return "scalar";
    case BACKEND_CPU_ISA_AVX2:
        return "avx2";
    case BACKEND_CPU_ISA_AVX512:
        return "avx512";
    default:
        return "auto";
    }
}

const char *cpu_precision_name(backend_precision p)
{
    switch (p) {
    case BACKEND_PRECISION_FP32:
        return "fp32";
    case BACKEND_PRECISION_BF16:
        return "bf16";
    case BACKEND_PRECISION_INT8:
        return "int8";
    default:
        return "auto";
    }
}

int cpu_precision_parse(const char *s, backend_precision *out)
{
    static const struct {
        const char *name;
        backend_precision p;
    } names[] = {{"auto", BACKEND_PRECISION_AUTO},
                 {"fp32", BACKEND_PRECISION_FP32},
                 {"bf16", BACKEND_PRECISION_BF16},
                 {"int8", BACKEND_PRECISION_INT8}};
    for (size_t i = 0; s && i < sizeof names / sizeof names[0]; i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].p;
            return AFF_OK;
        }
    }
    return AFF_EINVAL;
}

static bool has_avx512_bf16(void)
{
#if CPU_SCORE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

backend_cpu_isa cpu_isa_detect(backend_cpu_isa cap)
{
    backend_cpu_isa best = BACKEND_CPU_ISA_SCALAR;
#if CPU_SCORE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        best = BACKEND_CPU_ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
            best = BACKEND_CPU_ISA_AVX512;
    }
#endif
    if (cap != BACKEND_CPU_ISA_AUTO && cap < best) best = cap;
    return best;
}

backend_precision cpu_precision_default(backend_cpu_isa isa)
{
    /* The portable int8 loop is slower than BLAS fp32; the vector kernels are not. */
    return isa >= BACKEND_CPU_ISA_AVX2 ? BACKEND_PRECISION_INT8 : BACKEND_PRECISION_FP32;
}

/* ---- exact fp32 scoring -------------------------------------------------------------- */

static void dot_rows_portable(const float *restrict q, const float *restrict rows, uint32_t n,
                              uint32_t dim, float *restrict out)
{
    for (uint32_t r = 0; r < n; r++) {
        const float *x = rows + (size_t)r * dim;
        float acc[8] = {0};
        uint32_t j = 0;
        for (; j + 8 <= dim; j += 8)
            for (int l = 0; l < 8; l++)
                acc[l] += q[j + l] * x[j + l];
        float s = 0;
        for (; j < dim; j++)
            s += q[j] * x[j];
        out[r] =
            s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

#if CPU_SCORE_X86
/* Four independent FMA chains of 8 lanes (the portable loop does not vectorize in ISO C mode,
 * where GCC neither contracts to FMA nor reorders the sum). */
__attribute__((target("avx2,fma"))) static void dot_rows_avx2(const float *restrict q,
                                                              const float *restrict rows,
                                                              uint32_t n, uint32_t dim,
                                                              float *restrict out)
{
    for (uint32_t r = 0; r < n; r++) {
        const float *x = rows + (size_t)r * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        uint32_t j = 0;
        for (; j + 32 <= dim; j += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(x + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), _mm256_loadu_ps(x + j + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 16), _mm256_loadu_ps(x + j + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 24), _mm256_loadu_ps(x + j + 24), a3);
        }
        for (; j + 8 <= dim; j += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(x + j), a0);
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h);
        for (; j < dim; j++)
            s += q[j] * x[j];
        out[r] = s;
    }
}
#endif

#if CPU_SCORE_X86
/* dot_rows_avx2 for rows base[idx[i]], two rows at a time: each row's operations are those of
 * dot_rows_avx2, in the same order (so the same bits), interleaved; the rows are scattered, so
 * those four ahead are fetched (their first and middle lines). */
static inline __attribute__((always_inline, target("avx2,fma"))) void
dot_gather_avx2_n(const float *restrict q, const float *restrict base, const uint32_t *idx,
                  uint32_t n, const uint32_t dim, float *restrict out)
{
    uint32_t i = 0;
    for (; i + 2 <= n; i += 2) {
        if (i + 6 <= n) { /* the first and middle lines; the adjacent-line prefetcher pairs them */
            const float *n0 = base + (size_t)idx[i + 4] * dim, *n1 = base + (size_t)idx[i + 5] * dim;
            __builtin_prefetch(n0);
            __builtin_prefetch(n0 + dim / 2);
            __builtin_prefetch(n1);
            __builtin_prefetch(n1 + dim / 2);
        }
        const float *x = base + (size_t)idx[i] * dim, *y = base + (size_t)idx[i + 1] * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        uint32_t j = 0;
        for (; j + 32 <= dim; j += 32) {
            __m256 q0 = _mm256_loadu_ps(q + j), q1 = _mm256_loadu_ps(q + j + 8);
            __m256 q2 = _mm256_loadu_ps(q + j + 16), q3 = _mm256_loadu_ps(q + j + 24);
            a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + j), a0);
            b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(y + j), b0);
            a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + j + 8), a1);
            b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(y + j + 8), b1);
            a2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + j + 16), a2);
            b2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(y + j + 16), b2);
            a3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + j + 24), a3);
            b3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(y + j + 24), b3);
        }
        for (; j + 8 <= dim; j += 8) {
            __m256 q0 = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + j), a0);
            b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(y + j), b0);
        }
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m256 b = _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3));
        __m128 ha = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        __m128 hb = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
        ha = _mm_add_ps(ha, _mm_movehl_ps(ha, ha));
        hb = _mm_add_ps(hb, _mm_movehl_ps(hb, hb));
        ha = _mm_add_ss(ha, _mm_movehdup_ps(ha));
        hb = _mm_add_ss(hb, _mm_movehdup_ps(hb));
        float sa = _mm_cvtss_f32(ha), sb = _mm_cvtss_f32(hb);
        for (; j < dim; j++) {
            sa += q[j] * x[j];
            sb += q[j] * y[j];
        }
        out[i] = sa;
        out[i + 1] = sb;
    }
    if (i < n) dot_rows_avx2(q, base + (size_t)idx[i] * dim, 1, dim, out + i);
}

/* The usual dimensions get a copy with dim a constant (the loops unroll, about half the
 * instructions per row); the operations are the same. */
__attribute__((target("avx2,fma"))) static void dot_gather_avx2(const float *restrict q,
                                                                const float *restrict base,
                                                                const uint32_t *idx, uint32_t n,
                                                                uint32_t dim, float *restrict out)
{
    switch (dim) {
    case 64:
        dot_gather_avx2_n(q, base, idx, n, 64, out);
        break;
    case 128:
        dot_gather_avx2_n(q, base, idx, n, 128, out);
        break;
    case 256:
        dot_gather_avx2_n(q, base, idx, n, 256, out);
        break;
    default:
        dot_gather_avx2_n(q, base, idx, n, dim, out);
        break;
    }
}
#endif

/* out[i] = cpu_dot_rows of q and row idx[i] of base (the same bits), for n scattered rows. */
static void dot_gather(const float *restrict q, const float *restrict base, const uint32_t *idx,
                       uint32_t n, uint32_t dim, float *restrict out)
{
#if CPU_SCORE_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        dot_gather_avx2(q, base, idx, n, dim, out);
        return;
    }
#endif
    for (uint32_t i = 0; i < n; i++)
        dot_rows_portable(q, base + (size_t)idx[i] * dim, 1, dim, out + i);
}

void cpu_dot_rows(const float *restrict q, const float *restrict rows, uint32_t n, uint32_t dim,
                  float *restrict out)
{
#if CPU_SCORE_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        dot_rows_avx2(q, rows, n, dim, out);
        return;
    }
#endif
    dot_rows_portable(q, rows, n, dim, out);
}

/* ---- encoding ------------------------------------------------------------------------- */

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; inputs are finite */
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

void cpu_codes_init(cpu_codes *c, backend_precision precision, uint32_t dim, backend_cpu_isa isa)
{
    *c = (cpu_codes){.precision = precision, .dim = dim};
    c->steps = precision == BACKEND_PRECISION_INT8 ? (dim + 3) / 4 : (dim + 1) / 2;
    /* The AVX2 kernel sums two VPMADDUBSW results in 16 bits, which needs row codes in
     * [-63, 63] (2 · 2 · 127 · 63 < 2^15); the other kernels take the full [-127, 127]. */
    c->code_range = cpu_isa_detect(isa) == BACKEND_CPU_ISA_AVX2 ? 63 : 127;
}

void cpu_codes_free(cpu_codes *c)
{
    if (!c) return;
    free(c->blocks);
    free(c->scale);
    free(c->norm);
    free(c->err);
    c->blocks = NULL;
    c->scale = c->norm = c->err = NULL;
    c->capacity = 0;
}

static size_t block_bytes(const cpu_codes *c)
{
    return (size_t)c->steps * 32;
}

/* Rows past the last written one stay uninitialized (so never resident): the kernels read whole
 * blocks of 8 rows but report only rows below the table's count. */
static int grow_floats(float **p, uint32_t cap)
{
    float *n = realloc(*p, (size_t)cap * sizeof *n);
    if (!n) return AFF_ENOMEM;
    *p = n;
    return AFF_OK;
}

int cpu_codes_reserve(cpu_codes *c, uint32_t rows)
{
    if (rows <= c->capacity) return AFF_OK;
    uint32_t cap = (rows + 7u) & ~7u;
    size_t old_bytes = (size_t)c->capacity / 8 * block_bytes(c);
    size_t bytes = (size_t)cap / 8 * block_bytes(c);
    uint8_t *blocks = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!blocks) return AFF_ENOMEM;
    if (old_bytes) memcpy(blocks, c->blocks, old_bytes);
    if (grow_floats(&c->scale, cap) != AFF_OK || grow_floats(&c->norm, cap) != AFF_OK ||
        grow_floats(&c->err, cap) != AFF_OK) {
        free(blocks); /* the float arrays may have grown; harmless, capacity is unchanged */
        return AFF_ENOMEM;
    }
    free(c->blocks);
    c->blocks = blocks;
    c->capacity = cap;
    return AFF_OK;
}

/* Address of row `row`'s 4 bytes in slot g. */
static uint8_t *slot(const cpu_codes *c, uint32_t row, uint32_t g)
{
    return c->blocks + (size_t)(row >> 3) * block_bytes(c) + (size_t)g * 32 + (row & 7u) * 4;
}

void cpu_codes_set(cpu_codes *c, uint32_t row, const float *x)
{
    double norm = 0, err = 0; /* sums of squares */
    if (c->precision == BACKEND_PRECISION_INT8) {
        float amax = 0;
        for (uint32_t i = 0; i < c->dim; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        float s = amax > 0 ? amax / (float)c->code_range : 1.0f;
        for (uint32_t g = 0; g < c->steps; g++) {
            uint8_t *p = slot(c, row, g);
            for (uint32_t j = 0; j < 4; j++) {
                uint32_t i = g * 4 + j;
                long code = 0;
                if (i < c->dim) {
                    code = lrintf(x[i] / s);
                    code = code > c->code_range    ? c->code_range
                           : code < -c->code_range ? -c->code_range
                                                   : code;
                    double d = (double)x[i] - (double)s * (double)code;
                    norm += (double)x[i] * x[i];
                    err += d * d;
                }
                p[j] = (uint8_t)(code + c->code_range + 1);
            }
        }
        c->scale[row] = s;
    } else {
        for (uint32_t g = 0; g < c->steps; g++) {
            uint8_t *p = slot(c, row, g);
            for (uint32_t j = 0; j < 2; j++) {
                uint32_t i = g * 2 + j;
                uint16_t h = 0;
                if (i < c->dim) {
                    h = to_bf16(x[i]);
                    double d = (double)x[i] - (double)from_bf16(h);
                    norm += (double)x[i] * x[i];
                    err += d * d;
                }
                memcpy(p + 2 * j, &h, sizeof h);
            }
        }
        c->scale[row] = 1.0f;
    }
    /* Rounded up so the stored bounds never fall below the exact ones. */
    c->norm[row] = nextafterf((float)sqrt(norm), INFINITY);
    c->err[row] = nextafterf((float)sqrt(err), INFINITY);
}

void cpu_codes_copy(cpu_codes *c, uint32_t dst, uint32_t src)
{
    if (dst == src) return;
    for (uint32_t g = 0; g < c->steps; g++)
        memcpy(slot(c, dst, g), slot(c, src, g), 4);
    c->scale[dst] = c->scale[src];
    c->norm[dst] = c->norm[src];
    c->err[dst] = c->err[src];
}

uint64_t cpu_codes_bytes(const cpu_codes *c, uint32_t rows)
{
    return (uint64_t)(rows + 7u) / 8 * block_bytes(c) + (uint64_t)rows * 3 * sizeof(float);
}

double cpu_codes_bytes_per_row(backend_precision p, uint32_t dim)
{
    cpu_codes c;
    cpu_codes_init(&c, p, dim, BACKEND_CPU_ISA_SCALAR);
    return (double)block_bytes(&c) / 8.0 + 3 * sizeof(float);
}

/* ---- rows per category -------------------------------------------------------------- */

static bool grow_u32(uint32_t **p, uint32_t *cap, uint32_t need)
{
    if (need <= *cap) return true;
    uint32_t n = *cap ? *cap : 16;
    while (n < need)
        n = n > UINT32_MAX / 2 ? UINT32_MAX : 2 * n;
    uint32_t *g = realloc(*p, (size_t)n * sizeof *g);
    if (!g) return false;
    *p = g;
    *cap = n;
    return true;
}

int cpu_cat_rows_add(cpu_cat_rows *x, uint32_t row, uint32_t cat)
{
    if (x->broken) return AFF_ENOMEM;
    if (cat >= x->n_cats) {
        uint32_t m = x->n_cats ? x->n_cats : 16;
        while (m <= cat)
            m *= 2;
        uint32_t **rows = realloc(x->rows, (size_t)m * sizeof *rows);
        if (rows) x->rows = rows;
        uint32_t *n = rows ? realloc(x->n, (size_t)m * sizeof *n) : NULL;
        if (n) x->n = n;
        uint32_t *cap = n ? realloc(x->cap, (size_t)m * sizeof *cap) : NULL;
        if (!cap) goto broken;
        x->cap = cap;
        for (uint32_t c = x->n_cats; c < m; c++) {
            x->rows[c] = NULL;
            x->n[c] = x->cap[c] = 0;
        }
        x->n_cats = m;
    }
    if (row >= x->slot_cap) { /* slot and cat grow together */
        uint32_t cap = x->slot_cap;
        if (!grow_u32(&x->slot, &cap, row + 1)) goto broken;
        uint32_t *c = realloc(x->cat, (size_t)cap * sizeof *c);
        if (!c) goto broken; /* (slot keeps its larger array; slot_cap still says the old size) */
        x->cat = c;
        x->slot_cap = cap;
    }
    if (!grow_u32(&x->rows[cat], &x->cap[cat], x->n[cat] + 1)) goto broken;
    x->cat[row] = cat;
    x->slot[row] = x->n[cat];
    x->rows[cat][x->n[cat]++] = row;
    return AFF_OK;
broken:
    x->broken = true;
    return AFF_ENOMEM;
}

void cpu_cat_rows_remove(cpu_cat_rows *x, uint32_t row, uint32_t cat)
{
    if (x->broken) return;
    uint32_t at = row < x->slot_cap && cat < x->n_cats ? x->slot[row] : UINT32_MAX;
    if (at >= x->n[cat] || x->rows[cat][at] != row) { /* not listed: never use the index again */
        x->broken = true;
        return;
    }
    uint32_t last = x->rows[cat][--x->n[cat]];
    x->rows[cat][at] = last;
    x->slot[last] = at;
}

void cpu_cat_rows_free(cpu_cat_rows *x)
{
    if (!x) return;
    for (uint32_t c = 0; c < x->n_cats; c++)
        free(x->rows[c]);
    free(x->rows);
    free(x->n);
    free(x->cap);
    free(x->slot);
    free(x->cat);
    *x = (cpu_cat_rows){0};
}

uint64_t cpu_cat_rows_bytes(const cpu_cat_rows *x)
{
    uint64_t b = (uint64_t)x->slot_cap * 2 * sizeof(uint32_t) +
                 (uint64_t)x->n_cats * (sizeof(uint32_t *) + 2 * sizeof(uint32_t));
    for (uint32_t c = 0; c < x->n_cats; c++)
        b += (uint64_t)x->cap[c] * sizeof(uint32_t);
    return b;
}

/* ---- queries -------------------------------------------------------------------------- */

/* One prepared query: a = scale * row_scale * (dot - offset); e = alpha |x|_2 + beta |x - x~|_2. */
typedef struct cpu_query {
    float scale;
    int32_t offset;
    float alpha, beta;
} cpu_query;

/* A row the kernel could not rule out: hi = upper bound of its score, width = hi - lower. */
typedef struct cpu_hit {
    uint32_t row;
    uint32_t q; /* index within the kernel's query group */
    float hi, width;
} cpu_hit;

/* Queries per kernel call. */
#define GROUP 4u

/* One kernel call: blocks block0.. of the codes against nq (1..4) queries. */
typedef struct scan_args scan_args;
struct scan_args {
    const cpu_codes *c;
    uint32_t block0, nblocks;
    const uint32_t *qpack; /* nq × steps words: 4 int8 codes or 2 bf16 per word */
    const float *qf;       /* nq × 2·steps floats (bf16 values widened); bf16 only */
    const uint32_t *qwide; /* nq × steps × 8 words: each qpack word repeated (wide kernels) */
    const cpu_query *qc;   /* nq */
    uint32_t nq;
    float *thresh;         /* nq: report rows whose upper bound is >= this */
    const float *sq_norms; /* L2: |x|^2; NULL for inner product */
    uint32_t limit;        /* rows >= limit are never reported */
    cpu_hit *hits;         /* room for nblocks × 8 × nq (unused with a sink) */
    uint32_t nhits;        /* rows reported */
    /* When set (a search), each reported row goes to take_now() at once (a direct call, so
     * the report path inlines), and the query's threshold becomes the raised lower bound, so
     * the rest of the tile is tested against it: far fewer rows are reported than with a
     * threshold fixed for the whole tile, most of all for larger k. NULL: rows go to hits. */
    struct take_ctx *sink;
    /* With qcats (and block_cats): in blocks whose categories meet qcats[q] the threshold is
     * thresh_cat[q], elsewhere thresh[q]; a query whose filter admits few categories then
     * skips the blocks that hold none of them. */
    const uint64_t *block_cats;     /* cpu_search_table.block_cats */
    const backend_row_attrs *attrs; /* cpu_search_table.attrs (with qcats) */
    const uint32_t *cats;           /* table_cats() (with qcats) */
    const uint64_t *qcats;          /* nq blooms, or NULL */
    float *thresh_cat;              /* nq */
    /* Category floors (a capped query's full categories, qstate.full_cat and full_floor, live:
     * take() keeps them), per query of the call, or NULL: a row of category cat (cats, != 0)
     * with floor_cat[q][cat & 63] == cat and an upper bound below floor_val[q][cat & 63] is not
     * reported, unless backend_tag_bit(cat) is in floor_keep[q] (the categories another query of
     * the same vector may take). Set only where every query of the vector would drop such a row
     * (floor_rules), so the kernel drops on the spot what take() would, and nothing else. */
    const uint32_t *floor_cat[GROUP];
    const float *floor_val[GROUP];
    uint64_t floor_keep[GROUP];
    bool floors; /* some floor_cat[q] is set (then cats is too) */
    /* Up to SCAN_HOT of those floors (categories not in floor_keep[q], the highest floors
     * first: a shopper's crowded categories), copied when the call starts: the vector
     * epilogue raises each lane's threshold to its category's floor when the category is one
     * of these, so a crowded category's rows under its floor never set a mask bit. A floor
     * only rises, so a copy is a valid, if lower, floor for the whole call. */
    uint32_t hot_n[GROUP];
    uint32_t hot_cat[GROUP][2];
    float hot_floor[GROUP][2];
};
#define SCAN_HOT 2u

/* Row `row`'s category from the compact column `cats` when there is one, else from attrs. */
static inline uint32_t category_at(const uint32_t *cats, const backend_row_attrs *attrs,
                                   uint32_t row)
{
    return cats ? cats[row] : attrs[row].category;
}

/* The sink of a search (defined with the search below). */
static void take_now(scan_args *a, const cpu_hit *h);

typedef struct kernel_desc {
    void (*scan)(scan_args *a);
    int qrange; /* int8 query codes lie in [-qrange, qrange] */
    bool wide;  /* reads scan_args.qwide */
} kernel_desc;

/* Slack for float accumulation, scan and reference together, per unit of |q|_2 |x|_2. */
static double round_slack(uint32_t dim)
{
    return (2.0 * dim + 16.0) * 0x1p-24;
}

static void query_prepare(const cpu_codes *c, const kernel_desc *k, const float *q, cpu_query *out,
                          uint32_t *qpack, float *qf)
{
    const double grow = 1.0 + 0x1p-12;          /* covers the few float operations on the bounds */
    double qinf = 0, qnorm = 0, dq = 0, qt = 0; /* |q|_inf, |q|^2, |q - q~|^2, |q~|^2 */
    for (uint32_t i = 0; i < c->dim; i++) {
        qinf = fmax(qinf, fabs((double)q[i]));
        qnorm += (double)q[i] * q[i];
    }
    float scale = 1.0f;
    int32_t offset = 0;
    if (c->precision == BACKEND_PRECISION_INT8) {
        scale = qinf > 0 ? (float)qinf / (float)k->qrange : 1.0f;
        int32_t sum = 0;
        for (uint32_t g = 0; g < c->steps; g++) {
            uint32_t w = 0;
            for (uint32_t j = 0; j < 4; j++) {
                uint32_t i = g * 4 + j;
                long code = 0;
                if (i < c->dim) {
                    code = lrintf(q[i] / scale);
                    code = code > k->qrange ? k->qrange : code < -k->qrange ? -k->qrange : code;
                    double v = (double)scale * (double)code, d = (double)q[i] - v;
                    dq += d * d;
                    qt += v * v;
                }
                sum += (int32_t)code;
                w |= (uint32_t)(uint8_t)(int8_t)code << (8 * j);
            }
            qpack[g] = w;
        }
        offset = (c->code_range + 1) * sum;
    } else {
        for (uint32_t g = 0; g < c->steps; g++) {
            uint32_t w = 0;
            for (uint32_t j = 0; j < 2; j++) {
                uint32_t i = g * 2 + j;
                uint16_t h = i < c->dim ? to_bf16(q[i]) : 0;
                float v = from_bf16(h);
                if (i < c->dim) {
                    double d = (double)q[i] - (double)v;
                    dq += d * d;
                    qt += (double)v * v;
                }
                qf[2 * g + j] = v;
                w |= (uint32_t)h << (16 * j);
            }
            qpack[g] = w;
        }
    }
    /* e = |q - q~|_2 |x|_2 + |q~|_2 |x - x~|_2 + slack |q|_2 |x|_2 (Cauchy-Schwarz twice). */
    *out = (cpu_query){.scale = scale,
                       .offset = offset,
                       .alpha = (float)((sqrt(dq) + round_slack(c->dim) * sqrt(qnorm)) * grow),
                       .beta = (float)(sqrt(qt) * grow)};
}

/* ---- portable kernels ------------------------------------------------------------------- */

/* The threshold of query q for row's block (see scan_args.qcats). */
static inline float block_threshold(const scan_args *a, uint32_t row, uint32_t q)
{
    return a->qcats && (a->block_cats[row >> 3] & a->qcats[q]) ? a->thresh_cat[q] : a->thresh[q];
}

/* True when scan_args.floor_cat says the row is under its full category's floor. */
static inline bool under_floor(const scan_args *a, uint32_t row, uint32_t q, float hi)
{
    if (!a->floor_cat[q]) return false;
    const uint32_t cat = a->cats[row], b = cat & 63u;
    return cat && a->floor_cat[q][b] == cat && hi < a->floor_val[q][b] &&
           !(backend_tag_bit(cat) & a->floor_keep[q]);
}

static void push_hit(scan_args *a, uint32_t row, uint32_t q, float hi, float e)
{
    /* Under the plain threshold only a row of a restricted query's categories can pass. */
    if (a->qcats && hi < a->thresh[q] &&
        !(backend_tag_bit(category_at(a->cats, a->attrs, row)) & a->qcats[q]))
        return;
    if (a->floors && under_floor(a, row, q, hi)) return;
    float w = e + e;
    if (a->sq_norms) w += w;
    const cpu_hit h = {.row = row, .q = q, .hi = hi, .width = w};
    a->nhits++;
    if (a->sink)
        take_now(a, &h);
    else
        a->hits[a->nhits - 1] = h;
}

static void offer_scalar(scan_args *a, uint32_t row, uint32_t q, float dot)
{
    if (row >= a->limit) return;
    const cpu_codes *c = a->c;
    const cpu_query *qq = &a->qc[q];
    float av = dot * qq->scale * c->scale[row];
    float e = qq->alpha * c->norm[row] + qq->beta * c->err[row];
    float hi = av + e;
    if (a->sq_norms) hi = 2.0f * hi - a->sq_norms[row];
    if (hi >= block_threshold(a, row, q)) push_hit(a, row, q, hi, e);
}

static void scan_int8_scalar(scan_args *a)
{
    const uint32_t steps = a->c->steps;
    for (uint32_t b = a->block0; b < a->block0 + a->nblocks; b++) {
        const uint8_t *x = a->c->blocks + (size_t)b * block_bytes(a->c);
        for (uint32_t lane = 0; lane < 8; lane++) {
            for (uint32_t q = 0; q < a->nq; q++) {
                const uint32_t *qp = a->qpack + (size_t)q * steps;
                int32_t dot = 0;
                for (uint32_t g = 0; g < steps; g++)
                    for (uint32_t j = 0; j < 4; j++)
                        dot += (int32_t)x[g * 32 + lane * 4 + j] *
                               (int32_t)(int8_t)(uint8_t)(qp[g] >> (8 * j));
                offer_scalar(a, b * 8 + lane, q, (float)(dot - a->qc[q].offset));
            }
        }
    }
}

static void scan_bf16_scalar(scan_args *a)
{
    const uint32_t steps = a->c->steps;
    for (uint32_t b = a->block0; b < a->block0 + a->nblocks; b++) {
        const uint8_t *x = a->c->blocks + (size_t)b * block_bytes(a->c);
        for (uint32_t lane = 0; lane < 8; lane++) {
            for (uint32_t q = 0; q < a->nq; q++) {
                const float *qf = a->qf + (size_t)q * 2 * steps;
                float dot = 0;
                for (uint32_t g = 0; g < steps; g++) {
                    uint16_t h[2];
                    memcpy(h, x + g * 32 + lane * 4, sizeof h);
                    dot += from_bf16(h[0]) * qf[2 * g] + from_bf16(h[1]) * qf[2 * g + 1];
                }
                offer_scalar(a, b * 8 + lane, q, dot);
            }
        }
    }
}

/* ---- AVX2 and AVX-512 kernels ----------------------------------------------------------- */

#if CPU_SCORE_X86

/* The rare path of the vector epilogue: some of 8 rows passed the threshold. */
__attribute__((noinline)) static void push_mask(scan_args *a, uint32_t row0, uint32_t q, int mask,
                                                const float *hi, const float *e)
{
    for (uint32_t j = 0; j < 8; j++)
        if ((mask >> j & 1) && row0 + j < a->limit) push_hit(a, row0 + j, q, hi[j], e[j]);
}

/* Lanes of 8 row bits (b: each row's category & 63) whose bit is set in bloom: all ones. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256i
bloom_lanes_avx2(__m256i b, uint64_t bloom)
{
    /* a variable shift by 32 or more (b - 32 for b < 32 wraps) gives 0 */
    __m256i lo = _mm256_srlv_epi32(_mm256_set1_epi32((int)(uint32_t)bloom), b);
    __m256i hi = _mm256_srlv_epi32(_mm256_set1_epi32((int)(uint32_t)(bloom >> 32)),
                                   _mm256_sub_epi32(b, _mm256_set1_epi32(32)));
    __m256i bit = _mm256_and_si256(_mm256_or_si256(lo, hi), _mm256_set1_epi32(1));
    return _mm256_cmpeq_epi32(bit, _mm256_set1_epi32(1));
}

/* The rows of `mask` (8 rows row0.. < limit, upper bounds hi) not under their full
 * category's floor (scan_args.floor_cat): push_hit's floor test, lane by lane (two gathers
 * cost more than the few lanes), so such rows never leave the kernel. */
static inline __attribute__((always_inline, target("avx2,fma"))) int
lanes_over_floors_avx2(const scan_args *a, uint32_t row0, uint32_t q, __m256 hi, int mask)
{
    float his[8];
    _mm256_storeu_ps(his, hi);
    for (int m = mask; m; m &= m - 1) {
        const uint32_t j = (uint32_t)__builtin_ctz((unsigned)m);
        if (under_floor(a, row0 + j, q, his[j])) mask &= ~(1 << j);
    }
    return mask;
}

/* The thresholds of 8 full rows row0.. for query q, lane by lane from the compact category
 * column (a->cats): in a block of a restricted query's categories, thresh_cat[q] for the rows
 * of those categories (their bloom bits) and thresh[q] for the others, which push_hit would
 * drop under thresh[q] anyway; each row of a hot category (scan_args.hot_cat) at least its
 * floor, under which take() would drop it. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256
lane_thresholds_avx2(const scan_args *a, uint32_t row0, uint32_t q, bool cat_block)
{
    const __m256i cv = _mm256_loadu_si256((const __m256i *)(a->cats + row0));
    __m256 thr = _mm256_set1_ps(a->thresh[q]);
    if (cat_block)
        thr = _mm256_blendv_ps(
            thr, _mm256_set1_ps(a->thresh_cat[q]),
            _mm256_castsi256_ps(
                bloom_lanes_avx2(_mm256_and_si256(cv, _mm256_set1_epi32(63)), a->qcats[q])));
    __m256 f = _mm256_set1_ps(-INFINITY);
    for (uint32_t h = 0; h < a->hot_n[q]; h++)
        f = _mm256_blendv_ps(f, _mm256_set1_ps(a->hot_floor[q][h]),
                             _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                                 cv, _mm256_set1_epi32((int)a->hot_cat[q][h]))));
    return _mm256_max_ps(thr, f);
}

/* Bounds for 8 rows row0.. and query q from their 8 dot products; reports those that pass. */
static inline __attribute__((always_inline, target("avx2,fma"))) void
epilogue_avx2(scan_args *a, uint32_t row0, uint32_t q, __m256 dot)
{
    const cpu_codes *c = a->c;
    const cpu_query *qq = &a->qc[q];
    __m256 av = _mm256_mul_ps(_mm256_mul_ps(dot, _mm256_set1_ps(qq->scale)),
                              _mm256_loadu_ps(c->scale + row0));
    __m256 e =
        _mm256_fmadd_ps(_mm256_set1_ps(qq->alpha), _mm256_loadu_ps(c->norm + row0),
                        _mm256_mul_ps(_mm256_set1_ps(qq->beta), _mm256_loadu_ps(c->err + row0)));
    __m256 hi = _mm256_add_ps(av, e);
    if (a->sq_norms)
        hi = _mm256_fmsub_ps(_mm256_set1_ps(2.0f), hi, _mm256_loadu_ps(a->sq_norms + row0));
    const bool full = a->cats && row0 + 8 <= a->limit;
    const bool cat_block = a->qcats && (a->block_cats[row0 >> 3] & a->qcats[q]);
    const __m256 thr = full && (cat_block || a->hot_n[q])
                           ? lane_thresholds_avx2(a, row0, q, cat_block)
                           : _mm256_set1_ps(block_threshold(a, row0, q));
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(hi, thr, _CMP_GE_OQ));
    if (mask && full && a->floor_cat[q]) mask = lanes_over_floors_avx2(a, row0, q, hi, mask);
    if (mask) {
        float his[8], es[8];
        _mm256_storeu_ps(his, hi);
        _mm256_storeu_ps(es, e);
        push_mask(a, row0, q, mask, his, es);
    }
}

/* int8, AVX2: VPMADDUBSW (unsigned row code × signed query code, pairs summed to int16; query
 * codes lie in [-63, 63] so 2 · 255 · 63 cannot saturate) then VPMADDWD by 1 to int32. One block
 * (8 rows) against nq queries per pass: nq accumulators, no spills. */
static inline __attribute__((always_inline, target("avx2,fma"))) void
scan_int8_avx2_n(scan_args *a, const uint32_t nq)
{
    const uint32_t steps = a->c->steps;
    const size_t stride = block_bytes(a->c);
    const __m256i ones = _mm256_set1_epi16(1);
    const uint32_t *qp[4];
#pragma GCC unroll 4
    for (uint32_t q = 0; q < nq; q++)
        qp[q] = a->qpack + (size_t)q * steps;
    for (uint32_t b = a->block0; b < a->block0 + a->nblocks; b++) {
        const __m256i *x = (const __m256i *)(a->c->blocks + (size_t)b * stride);
        __m256i acc[4];
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++)
            acc[q] = _mm256_setzero_si256();
        for (size_t g = 0; g < steps; g++) {
            __m256i v = _mm256_load_si256(x + g);
#pragma GCC unroll 4
            for (uint32_t q = 0; q < nq; q++) {
                __m256i w = _mm256_set1_epi32((int)qp[q][g]);
                acc[q] =
                    _mm256_add_epi32(acc[q], _mm256_madd_epi16(_mm256_maddubs_epi16(v, w), ones));
            }
        }
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++) {
            __m256i off = _mm256_set1_epi32(a->qc[q].offset);
            epilogue_avx2(a, b * 8, q, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[q], off)));
        }
    }
}

/* int8, AVX2, row codes in [-63, 63] (stored + 64, so at most 127): two VPMADDUBSW results
 * (each pair sum at most 2 · 127 · 63) add in 16 bits before one VPMADDWD widens them, three
 * multiplies per 64 products instead of four. */
static inline __attribute__((always_inline, target("avx2,fma"))) void
scan_int8_avx2x2_n(scan_args *a, const uint32_t nq)
{
    const uint32_t steps = a->c->steps;
    const size_t stride = block_bytes(a->c);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i *qw[4]; /* each query word repeated 8 times: a memory operand, no broadcast */
#pragma GCC unroll 4
    for (uint32_t q = 0; q < nq; q++)
        qw[q] = (const __m256i *)a->qwide + (size_t)q * steps;
    for (uint32_t b = a->block0; b < a->block0 + a->nblocks; b++) {
        const __m256i *x = (const __m256i *)(a->c->blocks + (size_t)b * stride);
        __m256i acc[4];
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++)
            acc[q] = _mm256_setzero_si256();
        size_t g = 0;
        for (; g + 2 <= steps; g += 2) {
            __m256i v0 = _mm256_load_si256(x + g), v1 = _mm256_load_si256(x + g + 1);
#pragma GCC unroll 4
            for (uint32_t q = 0; q < nq; q++) {
                __m256i p =
                    _mm256_add_epi16(_mm256_maddubs_epi16(v0, _mm256_load_si256(qw[q] + g)),
                                     _mm256_maddubs_epi16(v1, _mm256_load_si256(qw[q] + g + 1)));
                acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(p, ones));
            }
        }
        if (g < steps) {
            __m256i v = _mm256_load_si256(x + g);
#pragma GCC unroll 4
            for (uint32_t q = 0; q < nq; q++)
                acc[q] = _mm256_add_epi32(
                    acc[q],
                    _mm256_madd_epi16(_mm256_maddubs_epi16(v, _mm256_load_si256(qw[q] + g)), ones));
        }
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++) {
            __m256i off = _mm256_set1_epi32(a->qc[q].offset);
            epilogue_avx2(a, b * 8, q, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[q], off)));
        }
    }
}

__attribute__((target("avx2,fma"))) static void scan_int8_avx2x2(scan_args *a)
{
    switch (a->nq) {
    case 1:
        scan_int8_avx2x2_n(a, 1);
        break;
    case 2:
        scan_int8_avx2x2_n(a, 2);
        break;
    case 3:
        scan_int8_avx2x2_n(a, 3);
        break;
    default:
        scan_int8_avx2x2_n(a, 4);
        break;
    }
}

__attribute__((target("avx2,fma"))) static void scan_int8_avx2(scan_args *a)
{
    switch (a->nq) {
    case 1:
        scan_int8_avx2_n(a, 1);
        break;
    case 2:
        scan_int8_avx2_n(a, 2);
        break;
    case 3:
        scan_int8_avx2_n(a, 3);
        break;
    default:
        scan_int8_avx2_n(a, 4);
        break;
    }
}

/* bf16, AVX2: no bf16 arithmetic, so each slot is widened to fp32 (even dims by a shift, odd
 * ones by a mask) and multiplied with FMA: the same arithmetic rate as fp32, half the bytes. */
static inline __attribute__((always_inline, target("avx2,fma"))) void
scan_bf16_avx2_n(scan_args *a, const uint32_t nq)
{
    const uint32_t steps = a->c->steps;
    const size_t stride = block_bytes(a->c);
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    const uint32_t end = a->block0 + a->nblocks;
    uint32_t b = a->block0;
    for (; b + 2 <= end; b += 2) {
        const uint8_t *x0 = a->c->blocks + (size_t)b * stride, *x1 = x0 + stride;
        __m256 ae0[4], ao0[4], ae1[4], ao1[4];
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++)
            ae0[q] = ao0[q] = ae1[q] = ao1[q] = _mm256_setzero_ps();
        for (uint32_t g = 0; g < steps; g++) {
            __m256i v0 = _mm256_load_si256((const __m256i *)(x0 + g * 32));
            __m256i v1 = _mm256_load_si256((const __m256i *)(x1 + g * 32));
            __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
            __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
            __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
            __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
#pragma GCC unroll 4
            for (uint32_t q = 0; q < nq; q++) {
                __m256 qe = _mm256_broadcast_ss(a->qf + (size_t)q * 2 * steps + 2 * g);
                __m256 qo = _mm256_broadcast_ss(a->qf + (size_t)q * 2 * steps + 2 * g + 1);
                ae0[q] = _mm256_fmadd_ps(e0, qe, ae0[q]);
                ao0[q] = _mm256_fmadd_ps(o0, qo, ao0[q]);
                ae1[q] = _mm256_fmadd_ps(e1, qe, ae1[q]);
                ao1[q] = _mm256_fmadd_ps(o1, qo, ao1[q]);
            }
        }
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++) {
            epilogue_avx2(a, b * 8, q, _mm256_add_ps(ae0[q], ao0[q]));
            epilogue_avx2(a, b * 8 + 8, q, _mm256_add_ps(ae1[q], ao1[q]));
        }
    }
    for (; b < end; b++) {
        const uint8_t *x0 = a->c->blocks + (size_t)b * stride;
        for (uint32_t q = 0; q < nq; q++) {
            __m256 ae = _mm256_setzero_ps(), ao = _mm256_setzero_ps();
            for (uint32_t g = 0; g < steps; g++) {
                __m256i v0 = _mm256_load_si256((const __m256i *)(x0 + g * 32));
                ae =
                    _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)),
                                    _mm256_broadcast_ss(a->qf + (size_t)q * 2 * steps + 2 * g), ae);
                ao = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask)),
                                     _mm256_broadcast_ss(a->qf + (size_t)q * 2 * steps + 2 * g + 1),
                                     ao);
            }
            epilogue_avx2(a, b * 8, q, _mm256_add_ps(ae, ao));
        }
    }
}

__attribute__((target("avx2,fma"))) static void scan_bf16_avx2(scan_args *a)
{
    switch (a->nq) {
    case 1:
        scan_bf16_avx2_n(a, 1);
        break;
    case 2:
        scan_bf16_avx2_n(a, 2);
        break;
    case 3:
        scan_bf16_avx2_n(a, 3);
        break;
    default:
        scan_bf16_avx2_n(a, 4);
        break;
    }
}

#define AVX512_INT8_TARGET "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni"
#define AVX512_BF16_TARGET "avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16"

/* 32 bytes of two blocks' codes (x0, x1: one step of each) in one 512-bit register, x0 low. */
static inline __attribute__((always_inline, target("avx512f"))) __m512i
block_pair(const uint8_t *x0, const uint8_t *x1)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)x0)),
                              _mm256_load_si256((const __m256i *)x1), 1);
}

/* The upper 8 floats of v (AVX512F alone: no AVX512DQ extract). */
static inline __attribute__((always_inline, target("avx512f"))) __m256 high_half(__m512 v)
{
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* int8, AVX-512 VNNI: VPDPBUSD adds four unsigned × signed byte products to each int32 lane in
 * one instruction, without intermediate saturation (query codes use the full [-127, 127]). */
static inline __attribute__((always_inline, target(AVX512_INT8_TARGET))) void
scan_int8_vnni_n(scan_args *a, const uint32_t nq)
{
    const uint32_t steps = a->c->steps;
    const size_t stride = block_bytes(a->c);
    const uint32_t end = a->block0 + a->nblocks;
    uint32_t b = a->block0;
    /* Four blocks per pass, two to a 512-bit register (one block per 256-bit half): each
     * VPDPBUSD does 16 rows' products for a query, half the multiplies of 256-bit registers. */
    for (; b + 4 <= end; b += 4) {
        const uint8_t *x0 = a->c->blocks + (size_t)b * stride;
        const uint8_t *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
        __m512i acc01[4], acc23[4];
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++)
            acc01[q] = acc23[q] = _mm512_setzero_si512();
        for (uint32_t g = 0; g < steps; g++) {
            const __m512i v01 = block_pair(x0 + g * 32, x1 + g * 32);
            const __m512i v23 = block_pair(x2 + g * 32, x3 + g * 32);
#pragma GCC unroll 4
            for (uint32_t q = 0; q < nq; q++) {
                const __m512i w = _mm512_set1_epi32((int)a->qpack[q * steps + g]);
                acc01[q] = _mm512_dpbusd_epi32(acc01[q], v01, w);
                acc23[q] = _mm512_dpbusd_epi32(acc23[q], v23, w);
            }
        }
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++) {
            const __m512 d01 =
                _mm512_cvtepi32_ps(_mm512_sub_epi32(acc01[q], _mm512_set1_epi32(a->qc[q].offset)));
            const __m512 d23 =
                _mm512_cvtepi32_ps(_mm512_sub_epi32(acc23[q], _mm512_set1_epi32(a->qc[q].offset)));
            epilogue_avx2(a, b * 8, q, _mm512_castps512_ps256(d01));
            epilogue_avx2(a, b * 8 + 8, q, high_half(d01));
            epilogue_avx2(a, b * 8 + 16, q, _mm512_castps512_ps256(d23));
            epilogue_avx2(a, b * 8 + 24, q, high_half(d23));
        }
    }
    for (; b < end; b++) {
        const uint8_t *x0 = a->c->blocks + (size_t)b * stride;
        for (uint32_t q = 0; q < nq; q++) {
            __m256i acc = _mm256_setzero_si256();
            for (uint32_t g = 0; g < steps; g++)
                acc = _mm256_dpbusd_epi32(acc, _mm256_load_si256((const __m256i *)(x0 + g * 32)),
                                          _mm256_set1_epi32((int)a->qpack[q * steps + g]));
            __m256i off = _mm256_set1_epi32(a->qc[q].offset);
            epilogue_avx2(a, b * 8, q, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, off)));
        }
    }
}

__attribute__((target(AVX512_INT8_TARGET))) static void scan_int8_vnni(scan_args *a)
{
    switch (a->nq) {
    case 1:
        scan_int8_vnni_n(a, 1);
        break;
    case 2:
        scan_int8_vnni_n(a, 2);
        break;
    case 3:
        scan_int8_vnni_n(a, 3);
        break;
    default:
        scan_int8_vnni_n(a, 4);
        break;
    }
}

/* bf16, AVX-512 BF16: VDPBF16PS adds both products of a bf16 pair to each fp32 lane. */
static inline __attribute__((always_inline, target(AVX512_BF16_TARGET))) void
scan_bf16_avx512_n(scan_args *a, const uint32_t nq)
{
    const uint32_t steps = a->c->steps;
    const size_t stride = block_bytes(a->c);
    const uint32_t end = a->block0 + a->nblocks;
    uint32_t b = a->block0;
    /* Four blocks per pass, two to a 512-bit register, as scan_int8_vnni_n (each lane adds
     * its row's pairs in the same order: the same bits as 256-bit registers). */
    for (; b + 4 <= end; b += 4) {
        const uint8_t *x0 = a->c->blocks + (size_t)b * stride;
        const uint8_t *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
        __m512 acc01[4], acc23[4];
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++)
            acc01[q] = acc23[q] = _mm512_setzero_ps();
        for (uint32_t g = 0; g < steps; g++) {
            const __m512i v01 = block_pair(x0 + g * 32, x1 + g * 32);
            const __m512i v23 = block_pair(x2 + g * 32, x3 + g * 32);
#pragma GCC unroll 4
            for (uint32_t q = 0; q < nq; q++) {
                const __m512i w = _mm512_set1_epi32((int)a->qpack[q * steps + g]);
                acc01[q] = _mm512_dpbf16_ps(acc01[q], (__m512bh)v01, (__m512bh)w);
                acc23[q] = _mm512_dpbf16_ps(acc23[q], (__m512bh)v23, (__m512bh)w);
            }
        }
#pragma GCC unroll 4
        for (uint32_t q = 0; q < nq; q++) {
            epilogue_avx2(a, b * 8, q, _mm512_castps512_ps256(acc01[q]));
            epilogue_avx2(a, b * 8 + 8, q, high_half(acc01[q]));
            epilogue_avx2(a, b * 8 + 16, q, _mm512_castps512_ps256(acc23[q]));
            epilogue_avx2(a, b * 8 + 24, q, high_half(acc23[q]));
        }
    }
    for (; b < end; b++) {
        const uint8_t *x0 = a->c->blocks + (size_t)b * stride;
        for (uint32_t q = 0; q < nq; q++) {
            __m256 acc = _mm256_setzero_ps();
            for (uint32_t g = 0; g < steps; g++)
                acc = _mm256_dpbf16_ps(acc,
                                       (__m256bh)_mm256_load_si256((const __m256i *)(x0 + g * 32)),
                                       (__m256bh)_mm256_set1_epi32((int)a->qpack[q * steps + g]));
            epilogue_avx2(a, b * 8, q, acc);
        }
    }
}

__attribute__((target(AVX512_BF16_TARGET))) static void scan_bf16_avx512(scan_args *a)
{
    switch (a->nq) {
    case 1:
        scan_bf16_avx512_n(a, 1);
        break;
    case 2:
        scan_bf16_avx512_n(a, 2);
        break;
    case 3:
        scan_bf16_avx512_n(a, 3);
        break;
    default:
        scan_bf16_avx512_n(a, 4);
        break;
    }
}

#endif /* CPU_SCORE_X86 */

static kernel_desc pick_kernel(const cpu_codes *c, backend_cpu_isa isa)
{
    if (c->precision == BACKEND_PRECISION_INT8) {
#if CPU_SCORE_X86
        if (isa >= BACKEND_CPU_ISA_AVX512) return (kernel_desc){scan_int8_vnni, 127, false};
        if (isa >= BACKEND_CPU_ISA_AVX2)
            return c->code_range <= 63 ? (kernel_desc){scan_int8_avx2x2, 63, true}
                                       : (kernel_desc){scan_int8_avx2, 63, false};
#endif
        return (kernel_desc){scan_int8_scalar, 127, false};
    }
#if CPU_SCORE_X86
    if (isa >= BACKEND_CPU_ISA_AVX512 && has_avx512_bf16())
        return (kernel_desc){scan_bf16_avx512, 0, false};
    if (isa >= BACKEND_CPU_ISA_AVX2) return (kernel_desc){scan_bf16_avx2, 0, false};
#endif
    (void)isa;
    (void)has_avx512_bf16;
    return (kernel_desc){scan_bf16_scalar, 0, false};
}

/* ---- search ----------------------------------------------------------------------------- */

/* The wide copy of n packed query words (each repeated 8 times), taken from scratch (64-byte
 * aligned), or NULL when out of memory. */
static uint32_t *widen(const uint32_t *qpack, size_t n, aff_scratch *scratch)
{
    uint32_t *w = aff_scratch_array(scratch, n * 8, sizeof *w);
    if (w)
        for (size_t i = 0; i < n; i++)
            for (int l = 0; l < 8; l++)
                w[i * 8 + l] = qpack[i];
    return w;
}

int cpu_score_bound(const cpu_codes *c, backend_cpu_isa isa, const float *q, uint32_t row,
                    float *approx, float *bound)
{
    const kernel_desc kd = pick_kernel(c, isa);
    cpu_query qc;
    uint32_t *qwide = NULL;
    aff_scratch *scratch;
    int rc = AFF_ENOMEM;
    if (aff_scratch_create(&scratch) != AFF_OK) return rc;
    uint32_t *qpack = aff_scratch_array(scratch, c->steps, sizeof *qpack);
    float *qf = aff_scratch_array(scratch, (size_t)c->steps * 2, sizeof *qf);
    if (!qpack || !qf) goto out;
    query_prepare(c, &kd, q, &qc, qpack, qf);
    qwide = kd.wide ? widen(qpack, c->steps, scratch) : NULL;
    if (kd.wide && !qwide) goto out;
    cpu_hit hits[8];
    float thresh = -INFINITY;
    scan_args a = {.c = c,
                   .block0 = row / 8,
                   .nblocks = 1,
                   .qpack = qpack,
                   .qf = qf,
                   .qwide = qwide,
                   .qc = &qc,
                   .nq = 1,
                   .thresh = &thresh,
                   .limit = row + 1,
                   .hits = hits};
    kd.scan(&a);
    rc = AFF_EINTERNAL;
    for (uint32_t i = 0; i < a.nhits; i++) {
        if (hits[i].row != row) continue;
        *bound = hits[i].width / 2;
        *approx = hits[i].hi - *bound;
        rc = AFF_OK;
    }
out:
    aff_scratch_destroy(scratch);
    return rc;
}

/* Bytes of codes scanned per tile: the tile stays in L2 while every query group passes over it. */
#define TILE_BYTES (64u * 1024u)

typedef struct cand {
    float hi;
    uint32_t row;
} cand;

/* One query's state in one thread: the k best scores seen (their k-th is L) and the rows whose
 * upper bound reached L when they were seen. A reported row the heap would take on its lower
 * bound is scored in fp32 at once and enters with that exact score (take()), so L is the k-th
 * best exact score of the rows seen, not a lower bound: a row is reported when its upper bound
 * reaches it, a band of one error bound instead of two, and about 40% fewer rows are reported
 * (bench_cpu_score --capped). The heap and the first candidate list
 * come from the search's arena; a list that outgrows it moves to the heap (c_owned), since
 * OpenMP threads cannot take from the arena. */
#define FULL_CATS 64 /* qstate: full categories remembered per query, one per cat & 63 */
#define QSTATE_HOT 4 /* qstate: highest floors kept, for the SCAN_HOT the kernel applies */

typedef struct qstate {
    topk_heap lo;
    cand *c;
    uint32_t n, cap;
    uint32_t per_cat; /* backend_search.max_per_category for this query; 0: none (else lo is
                       * tagged with each entry's category) */
    bool f_attrs;     /* its filter tests attributes (backend_filter_tests_attrs) */
    bool c_owned;     /* c was malloc'ed here and is freed at the end of the search */
    /* Categories known full (category_floor) and their floors: facts about rows already
     * seen, so a floor stays valid after those rows leave the heap; checked before any
     * heap work, since a shopper's crowded category reports most of its rows. Slot cat & 63
     * holds the latest such category of its bucket (0: none; category 0 is never capped):
     * forgetting a floor only costs pruning. n_full: slots in use. */
    uint32_t n_full;
    uint32_t full_cat[FULL_CATS];
    float full_floor[FULL_CATS];
    /* Capped: entries of lo per category & 63, at least the entries of any one category, so
     * a category whose bucket is below the cap is known not full without counting. */
    uint16_t held[64];
    /* The known floors, highest first (hot_cat 0: an empty slot): the crowded categories
     * whose floors the vector epilogue applies (scan_args.hot_cat). Kept apart from full_cat,
     * whose slots may forget a floor. */
    uint32_t hot_cat[QSTATE_HOT];
    float hot_floor[QSTATE_HOT];
    const float *qv; /* the query's fp32 vector (backend_search.queries), for exact scores */
} qstate;

/* The compact category column of t (cpu_cat_rows.cat), or NULL when t has none usable. */
static const uint32_t *table_cats(const cpu_search_table *t)
{
    return t->cat_rows && !t->cat_rows->broken ? t->cat_rows->cat : NULL;
}

/* Does `row`, of category cat, pass filter f (NULL passes)? f_attrs: backend_filter_tests_attrs
 * (f); without such tests the row's attributes are not read (cat is used instead). */
static inline bool row_passes(const cpu_search_table *t, const backend_filter *f, bool f_attrs,
                              uint32_t row, uint32_t cat)
{
    if (!f) return true;
    if (f_attrs) return backend_filter_matches(f, &t->attrs[row], row);
    return backend_filter_category_passes(f, cat) && backend_filter_row_passes(f, row);
}

/* The floor of category cat in capped heap h (tagged with categories): when h holds per_cat
 * rows of it, the worst of them (a row of that category below it cannot be in the capped
 * top-k: per_cat rows of its own category beat it), else -inf. *worst_at: that entry's index
 * (UINT32_MAX: not full). */
static float category_floor(const topk_heap *h, uint32_t per_cat, uint32_t cat, uint32_t *worst_at)
{
    /* Count first, without branches: most categories are not full. */
    uint32_t held = 0;
    for (uint32_t i = 0; i < h->n; i++)
        held += h->tags[i] == cat;
    *worst_at = UINT32_MAX;
    if (held < per_cat) return -INFINITY;
    uint32_t worst = UINT32_MAX;
    for (uint32_t i = 0; i < h->n; i++) {
        if (h->tags[i] != cat) continue;
        if (worst == UINT32_MAX ||
            topk_better(h->scores[worst], h->rows[worst], h->scores[i], h->rows[i]))
            worst = i;
    }
    *worst_at = worst;
    return h->scores[worst];
}

/* topk_push under a category cap (backend_search.max_per_category; per_cat 0: none). The heap
 * holds the best entries of the union of each category's per_cat best, so its worst entry (L
 * for the lower bounds) only rises, and a row under it cannot be in the capped top-k: k held
 * rows, at most per_cat of any category, all score above it, and taking rows best first
 * takes at least as many of each category's as are held before reaching it. */
static void push_capped(topk_heap *h, uint32_t per_cat, float score, uint32_t row, uint32_t cat)
{
    if (!per_cat || !cat || !topk_would_accept(h, score, row)) {
        topk_push_tagged(h, score, row, cat); /* (a no-op when not accepted) */
        return;
    }
    uint32_t worst;
    category_floor(h, per_cat, cat, &worst);
    if (worst == UINT32_MAX)
        topk_push_tagged(h, score, row, cat);
    else if (topk_better(score, row, h->scores[worst], h->rows[worst]))
        topk_replace(h, worst, score, row, cat);
}

/* One pass over capped heap h for category cat, the replacing case of push_capped_counted:
 * its entries (*held), the worst of them (*worst_at, UINT32_MAX: none) and the lowest score of
 * the others (+inf: none), so the floor after the worst is replaced is known without a second
 * pass. */
static void category_entries(const topk_heap *h, uint32_t cat, uint32_t *held,
                             uint32_t *worst_at, float *second)
{
    uint32_t n = 0, worst = UINT32_MAX;
    float next = INFINITY;
    for (uint32_t i = 0; i < h->n; i++) {
        if (h->tags[i] != cat) continue;
        n++;
        if (worst == UINT32_MAX) {
            worst = i;
        } else if (topk_better(h->scores[worst], h->rows[worst], h->scores[i], h->rows[i])) {
            next = h->scores[worst] < next ? h->scores[worst] : next;
            worst = i;
        } else {
            next = h->scores[i] < next ? h->scores[i] : next;
        }
    }
    *held = n;
    *worst_at = worst;
    *second = next;
}

/* Pushes an accepted row (topk_would_accept) into capped heap st->lo, keeping st->held. */
static void push_counted(qstate *st, float score, uint32_t row, uint32_t cat)
{
    topk_heap *h = &st->lo;
    if (h->n == h->k) st->held[h->tags[0] & 63]--; /* the worst entry leaves */
    topk_push_tagged(h, score, row, cat);
    st->held[cat & 63]++;
}

/* push_capped into st->lo for a row topk_would_accept() takes (cat != 0); returns cat's floor
 * afterwards (category_floor()). */
static float push_capped_counted(qstate *st, float score, uint32_t row, uint32_t cat)
{
    topk_heap *h = &st->lo;
    uint32_t held = 0, worst;
    float second;
    if (st->held[cat & 63] >= st->per_cat) category_entries(h, cat, &held, &worst, &second);
    if (held < st->per_cat) { /* not full: the row joins (and may evict the global worst) */
        push_counted(st, score, row, cat);
        return st->held[cat & 63] >= st->per_cat ? category_floor(h, st->per_cat, cat, &worst)
                                                 : -INFINITY;
    }
    if (!topk_better(score, row, h->scores[worst], h->rows[worst])) return h->scores[worst];
    topk_replace(h, worst, score, row, cat); /* same category: the counts stay */
    return score < second ? score : second;  /* the lowest of its held rows now */
}

static float lower_threshold(const qstate *st)
{
    return st->lo.n < st->lo.k ? -INFINITY : st->lo.scores[0];
}

static const backend_filter *filter_of(const backend_search *s, uint32_t q)
{
    if (!s->filters || !s->filters[q] || backend_filter_is_empty(s->filters[q])) return NULL;
    return s->filters[q];
}

/* Keeps cat's floor among st's highest (qstate.hot_cat), highest first. */
static void note_hot_floor(qstate *st, uint32_t cat, float floor)
{
    uint32_t i = 0;
    while (i < QSTATE_HOT && st->hot_cat[i] && st->hot_cat[i] != cat)
        i++;
    if (i == QSTATE_HOT) { /* not held and no room: it replaces the lowest if higher */
        i = QSTATE_HOT - 1;
        if (!(floor > st->hot_floor[i])) return;
    } else if (st->hot_cat[i] == cat && !(floor > st->hot_floor[i])) {
        return;
    }
    st->hot_cat[i] = cat;
    st->hot_floor[i] = floor;
    for (; i > 0 && st->hot_floor[i] > st->hot_floor[i - 1]; i--) {
        const uint32_t c = st->hot_cat[i - 1];
        const float f = st->hot_floor[i - 1];
        st->hot_cat[i - 1] = st->hot_cat[i];
        st->hot_floor[i - 1] = st->hot_floor[i];
        st->hot_cat[i] = c;
        st->hot_floor[i] = f;
    }
}

/* Records that category cat holds per_cat rows with lower bounds of at least floor. */
static void remember_floor(qstate *st, uint32_t cat, float floor)
{
    if (floor == -INFINITY) return;
    if (cat) note_hot_floor(st, cat, floor);
    const uint32_t b = cat % FULL_CATS;
    if (st->full_cat[b] == cat) {
        st->full_floor[b] = floor > st->full_floor[b] ? floor : st->full_floor[b];
        return;
    }
    st->n_full += st->full_cat[b] == 0;
    st->full_cat[b] = cat;
    st->full_floor[b] = floor;
}

/* True when a row of category cat with upper bound hi is below that category's remembered
 * floor. */
static inline bool below_floor(const qstate *st, uint32_t cat, float hi)
{
    const uint32_t b = cat % FULL_CATS;
    return st->full_cat[b] == cat && cat && hi < st->full_floor[b];
}

/* The exact score of `row` for query vector qv, as the re-rank computes it (the same bits). */
static float exact_score(const cpu_search_table *t, const float *qv, uint32_t row)
{
    float d;
    cpu_dot_rows(qv, t->rows + (size_t)row * t->codes->dim, 1, t->codes->dim, &d);
    return t->sq_norms ? 2.0f * d - t->sq_norms[row] : d;
}

/* Takes one reported row: filter, heap (an exact score, see qstate), candidate. Returns false
 * when out of memory. */
static bool take(const cpu_search_table *t, const uint32_t *cats, const backend_filter *f,
                 qstate *st, const cpu_hit *h)
{
    float L = lower_threshold(st);
    /* Under this query's own L (a row reported for another query of its vector) neither bound
     * can change anything: skip the filter and the heap. */
    if (h->hi < L && h->width >= 0.0f) return true;
    /* the category from the compact column: only a filter with other tests reads attributes */
    const uint32_t cat = st->per_cat || (f && f->category_bits && !st->f_attrs)
                             ? category_at(cats, t->attrs, h->row)
                             : 0;
    if (st->per_cat && below_floor(st, cat, h->hi)) return true; /* per_cat better rows */
    if (!row_passes(t, f, st->f_attrs, h->row, cat)) return true;
    float lb = h->hi - h->width;
    cpu_hit exact;
    if (topk_would_accept(&st->lo, lb, h->row)) { /* the heap takes exact scores only */
        const float x = exact_score(t, st->qv, h->row);
        exact = (cpu_hit){.row = h->row, .q = h->q, .hi = x, .width = 0.0f};
        h = &exact;
        lb = x;
    }
    if (!st->per_cat) {
        topk_push_tagged(&st->lo, lb, h->row, cat);
    } else if (topk_would_accept(&st->lo, lb, h->row)) { /* else nothing changes */
        if (!cat) {
            push_counted(st, lb, h->row, 0); /* no category: no cap */
        } else if (!below_floor(st, cat, lb)) { /* else per_cat rows of its category have
                                                  * better lower bounds: it is not among them */
            remember_floor(st, cat, push_capped_counted(st, lb, h->row, cat));
            if (below_floor(st, cat, h->hi)) return true; /* its category is full */
        }
    }
    L = lower_threshold(st);
    if (h->hi < L) return true;
    if (st->n == st->cap) {
        uint32_t m = 0;
        for (uint32_t i = 0; i < st->n; i++)
            if (st->c[i].hi >= L) st->c[m++] = st->c[i];
        st->n = m;
        if (m > st->cap / 2) {
            cand *grown = st->c_owned ? realloc(st->c, (size_t)st->cap * 2 * sizeof *grown)
                                      : malloc((size_t)st->cap * 2 * sizeof *grown);
            if (!grown) return false;
            if (!st->c_owned) memcpy(grown, st->c, st->n * sizeof *grown);
            st->c = grown;
            st->c_owned = true;
            st->cap *= 2;
        }
    }
    st->c[st->n++] = (cand){h->hi, h->row};
    return true;
}

uint64_t cpu_block_cats(const backend_row_attrs *attrs, uint32_t b, uint32_t count)
{
    uint64_t m = 0;
    for (uint32_t r = b * 8; r < b * 8 + 8 && r < count; r++)
        m |= backend_tag_bit(attrs[r].category);
    return m;
}

/* The categories filter f admits, as a block_cats bloom (bit c & 63 for category c: the OR of
 * the words of its category bit set); every bit when f does not restrict categories. */
static uint64_t filter_cats(const backend_filter *f)
{
    if (!f || !f->category_bits) return ~(uint64_t)0;
    uint64_t m = 0;
    for (uint32_t w = 0; w < f->category_words; w++)
        m |= f->category_bits[w];
    return m;
}

/* The scan's sink during a search: one thread's states for the queries of one kernel call. */
typedef struct take_ctx {
    const cpu_search_table *t;
    qstate *states;        /* this thread's, one per query */
    const uint32_t *phys;  /* scanned vector pi -> its first query */
    const uint32_t *next;  /* query -> the next query with the same vector, or UINT32_MAX */
    const uint64_t *mcats; /* per query: filter_cats() of its filter; NULL: none restricts */
    const backend_filter *const *filters; /* per query: filter_of(), once per search */
    const uint32_t *cats;                 /* table_cats() */
    uint32_t g0;                          /* the kernel call's first scanned vector */
    bool failed;
} take_ctx;

/* The thresholds of scanned vector pi: *all, the lowest lower bound of its queries; *plain,
 * that of its queries without a category restriction (+inf when none). */
static void family_thresholds(const take_ctx *tc, uint32_t pi, float *plain, float *all)
{
    /* b < a ? b : a is fminf here (a starts at +inf and never becomes NaN), without the call */
    *plain = *all = INFINITY;
    for (uint32_t q = tc->phys[pi]; q != UINT32_MAX; q = tc->next[q]) {
        float L = lower_threshold(&tc->states[q]);
        *all = L < *all ? L : *all;
        if ((!tc->mcats || tc->mcats[q] == ~(uint64_t)0) && L < *plain) *plain = L;
    }
}

/* Sets the thresholds of the kernel call's vector q (scan_args.thresh, thresh_cat). */
static void set_thresholds(const take_ctx *tc, scan_args *a, uint32_t q)
{
    float plain, all;
    family_thresholds(tc, tc->g0 + q, &plain, &all);
    if (a->qcats) {
        a->thresh[q] = plain;
        a->thresh_cat[q] = all;
    } else {
        a->thresh[q] = all;
    }
}

static void take_now(scan_args *a, const cpu_hit *h)
{
    take_ctx *tc = a->sink;
    const uint32_t pi = tc->g0 + h->q, q0 = tc->phys[pi];
    if (tc->next[q0] == UINT32_MAX && !a->qcats) { /* one query for the vector: the usual case */
        qstate *st = &tc->states[q0];
        if (!take(tc->t, tc->cats, tc->filters[q0], st, h)) tc->failed = true;
        a->thresh[h->q] = lower_threshold(st);
        return;
    }
    bool moved = false; /* some query's L rose: the thresholds follow */
    for (uint32_t q = q0; q != UINT32_MAX; q = tc->next[q]) {
        qstate *st = &tc->states[q];
        const float L = lower_threshold(st);
        if (!take(tc->t, tc->cats, tc->filters[q], st, h)) tc->failed = true;
        moved |= lower_threshold(st) != L;
    }
    if (moved) set_thresholds(tc, a, h->q);
}

/* The query of the family of scanned vector q0 (q0, next[q0], ...) whose category floors the
 * kernel may apply (scan_args.floor_cat), or UINT32_MAX: the one capped query, when every
 * other query of the family restricts categories, so that a row under the floor of its
 * category in the capped query is dropped by every query of the family (the capped one for
 * the floor, take(); the others by their filters) unless its category is one *keep (the OR of
 * the others' filter_cats()) says another query may take. cats: the table has a compact
 * category column (the kernel reads categories from it). */
static uint32_t floor_rules(const backend_search *s, const backend_filter *const *qfilt,
                            const uint32_t *next, uint32_t q0, bool cats, uint64_t *keep)
{
    uint32_t capped = UINT32_MAX;
    *keep = 0;
    if (!cats || !s->max_per_category) return UINT32_MAX;
    for (uint32_t q = q0; q != UINT32_MAX; q = next[q]) {
        if (s->max_per_category[q]) {
            if (capped != UINT32_MAX) return UINT32_MAX; /* two capped queries: none */
            capped = q;
            continue;
        }
        const uint64_t m = filter_cats(qfilt[q]);
        if (m == ~(uint64_t)0) return UINT32_MAX; /* it may take any row */
        *keep |= m;
    }
    return capped;
}

/* The rows filter f admits by category, when the table lists rows per category and they are
 * few enough to read one by one (CPU_POSTING_SHARE); 0 when the query should scan. */
static uint64_t posting_rows(const cpu_search_table *t, const backend_filter *f)
{
    const cpu_cat_rows *x = t->cat_rows;
    if (!x || x->broken || !f || !f->category_bits) return 0;
    const uint64_t limit = t->count / CPU_POSTING_SHARE;
    uint64_t total = 0;
    for (uint32_t w = 0; w < f->category_words; w++)
        for (uint64_t bits = f->category_bits[w]; bits; bits &= bits - 1) {
            uint32_t c = w * 64 + (uint32_t)__builtin_ctzll(bits);
            total += c < x->n_cats ? x->n[c] : 0;
            if (total > limit) return 0;
        }
    return total ? total : 1; /* an empty list: nothing to score, and no scan either */
}

/* Rows scored per dot_gather call in search_posted: 32 rows of d = 128 (16 KiB) stay in L1
 * while every query of the group scores them. */
#define POSTED_CHUNK 32u
/* Queries one search_posted call serves at most (the units of the re-rank loop stay small). */
#define POSTED_GROUP 16u

/* True when filters a and b admit the same categories (both restrict them). */
static bool same_categories(const backend_filter *a, const backend_filter *b)
{
    const uint32_t n = a->category_words > b->category_words ? a->category_words
                                                              : b->category_words;
    for (uint32_t w = 0; w < n; w++)
        if ((w < a->category_words ? a->category_bits[w] : 0) !=
            (w < b->category_words ? b->category_bits[w] : 0))
            return false;
    return true;
}

/* The exact top-k of queries q, next[q], next[next[q]], ... (posting_rows() said so for each;
 * their filters admit the same categories) from their categories' rows: each row scored as the
 * re-rank scores a candidate (the same bits), so each result is the scan's; a query's filter is
 * only asked about rows its heap would take. The group reads each chunk of rows once for all
 * its queries (the chunk stays in L1 while they score it). Returns rows read, per query. */
static uint64_t search_posted(const cpu_search_table *t, const backend_search *s,
                              const backend_filter *const *qfilt, const uint32_t *next, uint32_t q,
                              topk_heap *exact)
{
    const cpu_cat_rows *x = t->cat_rows;
    const backend_filter *lead = qfilt[q];
    const uint32_t dim = t->codes->dim;
    uint64_t read = 0;
    float d[POSTED_CHUNK];
    for (uint32_t w = 0; w < lead->category_words; w++)
        for (uint64_t bits = lead->category_bits[w]; bits; bits &= bits - 1) {
            uint32_t c = w * 64 + (uint32_t)__builtin_ctzll(bits);
            if (c >= x->n_cats) continue;
            const uint32_t *rows = x->rows[c], n = x->n[c];
            for (uint32_t i = 0; i < n; i += POSTED_CHUNK) {
                const uint32_t m = n - i < POSTED_CHUNK ? n - i : POSTED_CHUNK;
                for (uint32_t g = q; g != UINT32_MAX; g = next[g]) {
                    const backend_filter *f = qfilt[g];
                    const bool f_attrs = backend_filter_tests_attrs(f);
                    const uint32_t per_cat = s->max_per_category ? s->max_per_category[g] : 0;
                    topk_heap *ex = &exact[g];
                    dot_gather(s->queries + (size_t)g * dim, t->rows, rows + i, m, dim, d);
                    if (t->sq_norms)
                        for (uint32_t j = 0; j < m; j++)
                            d[j] = 2.0f * d[j] - t->sq_norms[rows[i + j]];
                    /* below the heap's worst score nothing enters (ties: topk_would_accept) */
                    float worst = ex->n < ex->k ? -INFINITY : ex->scores[0];
                    for (uint32_t j = 0; j < m; j++) {
                        const uint32_t row = rows[i + j];
                        if (!(d[j] >= worst) || !topk_would_accept(ex, d[j], row) ||
                            row >= t->count || !row_passes(t, f, f_attrs, row, c))
                            continue;
                        push_capped(ex, per_cat, d[j], row, c);
                        worst = ex->n < ex->k ? -INFINITY : ex->scores[0];
                    }
                    read += m;
                }
            }
        }
    return read;
}

/* Max-heap of candidates by upper bound: sift c[i] down in c[0..n). */
static void cand_sift(cand *c, uint32_t n, uint32_t i)
{
    const cand v = c[i];
    for (;;) {
        uint32_t ch = 2 * i + 1;
        if (ch >= n) break;
        if (ch + 1 < n && c[ch + 1].hi > c[ch].hi) ch++;
        if (!(c[ch].hi > v.hi)) break;
        c[i] = c[ch];
        i = ch;
    }
    c[i] = v;
}

/* Takes the candidate with the highest upper bound out of max-heap c[0..*n). */
static cand cand_pop(cand *c, uint32_t *n)
{
    const cand top = c[0];
    c[0] = c[--*n];
    if (*n) cand_sift(c, *n, 0);
    return top;
}

static void prefetch_row(const cpu_search_table *t, uint32_t row)
{
    const uint32_t dim = t->codes->dim;
    const char *p = (const char *)(t->rows + (size_t)row * dim);
    for (size_t off = 0; off < dim * sizeof(float); off += 64)
        __builtin_prefetch(p + off);
}

/* Pops the candidate with the highest upper bound from c[0..*n) that could still enter ex:
 * under a category cap, one whose upper bound is below the worst of per_cat rows of its
 * category already in ex (exact scores: the floor only rises) is dropped unread. Returns
 * row UINT32_MAX when none is left. */
static cand pop_useful(const cpu_search_table *t, const uint32_t *cats, uint32_t per_cat,
                       const topk_heap *ex, cand *c, uint32_t *n)
{
    while (*n) {
        const cand x = cand_pop(c, n);
        if (!per_cat || ex->n < per_cat) return x;
        const uint32_t cat = category_at(cats, t->attrs, x.row);
        uint32_t worst;
        if (!cat || !(x.hi < category_floor(ex, per_cat, cat, &worst))) return x;
    }
    return (cand){0.0f, UINT32_MAX};
}

/* Scanned query q: merges its threads' lower bounds, then scores in fp32 every candidate whose
 * upper bound reaches the final L into ex. Returns the candidates scored. */
static uint64_t rerank(const cpu_search_table *t, qstate *states, uint32_t nthreads, uint32_t nq,
                       uint32_t q, const float *qv, topk_heap *ex)
{
    qstate *st = &states[q];
    for (uint32_t th = 1; th < nthreads; th++) {
        const topk_heap *o = &states[(size_t)th * nq + q].lo;
        for (uint32_t i = 0; i < o->n; i++)
            push_capped(&st->lo, st->per_cat, o->scores[i], o->rows[i], o->tags ? o->tags[i] : 0);
    }
    const float L = lower_threshold(st);
    const uint32_t *cats = table_cats(t);
    if (st->per_cat) /* the merged heap's full categories, for below_floor */
        for (uint32_t i = 0; i < st->lo.n; i++) {
            uint32_t cat = st->lo.tags[i], w;
            if (cat) remember_floor(st, cat, category_floor(&st->lo, st->per_cat, cat, &w));
        }
    uint64_t scored = 0;
    for (uint32_t th = 0; th < nthreads; th++) {
        qstate *ts = &states[(size_t)th * nq + q];
        uint32_t m = 0;
        for (uint32_t i = 0; i < ts->n; i++)
            if (ts->c[i].hi >= L &&
                !(st->n_full &&
                  below_floor(st, category_at(cats, t->attrs, ts->c[i].row), ts->c[i].hi)))
                ts->c[m++] = ts->c[i];
        /* Highest upper bound first: once ex is full and a candidate's upper bound is below
         * its worst score, neither it nor any later one can enter (its fp32 score is at most
         * its upper bound), so the fp32 rows of the rest are never fetched. */
        for (uint32_t i = m / 2; i-- > 0;)
            cand_sift(ts->c, m, i);
        cand ahead[4]; /* popped, their rows being fetched (the rows are scattered) */
        uint32_t left = m, n_ahead = 0, first = 0;
        for (; n_ahead < 4 && left; n_ahead++) {
            ahead[n_ahead] = pop_useful(t, cats, st->per_cat, ex, ts->c, &left);
            if (ahead[n_ahead].row == UINT32_MAX) break;
            prefetch_row(t, ahead[n_ahead].row);
        }
        while (n_ahead) {
            const cand x = ahead[first];
            if (ex->n == ex->k && x.hi < ex->scores[0]) break;
            if (left && (ahead[first] = pop_useful(t, cats, st->per_cat, ex, ts->c, &left)).row !=
                            UINT32_MAX) { /* its slot takes the next one */
                prefetch_row(t, ahead[first].row);
            } else {
                n_ahead--;
            }
            first = (first + 1) % 4;
            push_capped(ex, st->per_cat, exact_score(t, qv, x.row), x.row,
                        st->per_cat ? category_at(cats, t->attrs, x.row) : 0);
            scored++;
        }
    }
    return scored;
}

float cpu_sq_norm(const float *x, uint32_t dim)
{
    float s = 0;
    for (uint32_t j = 0; j < dim; j++)
        s += x[j] * x[j];
    return s;
}

int cpu_score_search(const cpu_search_table *t, const backend_search *s, const size_t *offsets,
                     cpu_search_stats *stats, aff_err *err)
{
    const cpu_codes *c = t->codes;
    const uint32_t nq = s->nq, steps = c->steps, dim = c->dim;
    const kernel_desc kd = pick_kernel(c, t->isa);
    const uint32_t nblocks = (t->count + 7) / 8;
    int nthreads = t->threads > 0 ? t->threads : 1;
    if ((uint64_t)t->count * dim < 1u << 16) nthreads = 1;
    if ((uint32_t)nthreads > nblocks) nthreads = nblocks ? (int)nblocks : 1;
    uint32_t tile = TILE_BYTES / (uint32_t)block_bytes(c);
    tile = tile < 2 ? 2 : tile;
    uint32_t kmax = 1;
    for (uint32_t q = 0; q < nq; q++)
        kmax = s->k[q] > kmax ? s->k[q] : kmax;
    const uint32_t first_tile = (2 * kmax + 7) / 8 < tile ? (2 * kmax + 7) / 8 : tile;

    int rc = AFF_OK;
    uint32_t *qwide = NULL;
    /* Every temporary array comes from the caller's arena (or one of this call's own), taken
     * here on the calling thread; only candidate lists that outgrow theirs use the heap. */
    aff_scratch *tmp, *scratch = aff_scratch_or_temp(s->scratch, &tmp);
    if (!scratch) return aff__fail(err, AFF_ENOMEM, "out of memory for a batch of %u queries", nq);
    cpu_query *qc = aff_scratch_array(scratch, nq, sizeof *qc);
    uint64_t *qcats = NULL; /* per scanned vector, when some filter restricts categories */
    uint64_t *mcats = NULL; /* per query, then */
    uint32_t *qpack = aff_scratch_array(scratch, (size_t)nq * steps, sizeof *qpack);
    float *qf = aff_scratch_array(scratch, (size_t)nq * steps * 2, sizeof *qf);
    qstate *states = aff_scratch_zero(scratch, (size_t)nthreads * nq * sizeof *states);
    topk_heap *exact = aff_scratch_array(scratch, nq, sizeof *exact);
    /* Queries with the same vector (s->same_as) share one scan and keep their own heaps. */
    uint32_t *phys = aff_scratch_array(scratch, nq, sizeof *phys);
    uint32_t *fam = aff_scratch_array(scratch, nq, sizeof *fam), np = 0;
    const backend_filter **qfilt = aff_scratch_array(scratch, nq, sizeof *qfilt);
    /* Queries whose categories hold few rows read those rows (posting_rows) and do not scan. */
    bool *posted = aff_scratch_zero(scratch, nq * sizeof *posted);
    /* Posted queries whose filters admit the same categories read the rows together: pnext
     * chains a group from its first query (plead), at most POSTED_GROUP long. */
    uint32_t *pnext = aff_scratch_array(scratch, nq, sizeof *pnext);
    uint32_t *ptail = aff_scratch_array(scratch, nq, sizeof *ptail);
    uint32_t *psize = aff_scratch_array(scratch, nq, sizeof *psize);
    uint32_t *pleads = aff_scratch_array(scratch, nq, sizeof *pleads), nleads = 0;
    bool *plead = aff_scratch_zero(scratch, nq * sizeof *plead);
    /* head[p]: the first scanned query of s->same_as family p (UINT32_MAX: none yet) */
    uint32_t *head = aff_scratch_array(scratch, nq, sizeof *head);
    if (!qc || !qpack || !qf || !states || !exact || !phys || !fam || !qfilt || !posted || !head ||
        !pnext || !ptail || !psize || !pleads || !plead) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory for a batch of %u queries", nq);
        goto out;
    }
    /* A query that shares its vector with one that scans anyway (a promotion beside its
     * organic query) rides on that scan unless its rows are very few (CPU_POSTING_RIDE). */
    for (uint32_t q = 0; q < nq; q++) {
        qfilt[q] = filter_of(s, q);
        fam[q] = head[q] = UINT32_MAX;
    }
    for (uint32_t q = 0; q < nq; q++) {
        uint64_t rows = posting_rows(t, qfilt[q]);
        posted[q] = rows > 0;
        uint32_t p = s->same_as && s->same_as[q] < q ? s->same_as[q] : q;
        if (!rows) head[p] = 0; /* family p scans */
        if (rows > t->count / CPU_POSTING_RIDE) fam[q] = 0; /* posted only if p does not scan */
    }
    for (uint32_t q = 0; q < nq; q++) {
        uint32_t p = s->same_as && s->same_as[q] < q ? s->same_as[q] : q;
        if (posted[q] && fam[q] == 0 && head[p] == 0) posted[q] = false;
    }
    for (uint32_t q = 0; q < nq; q++) {
        pnext[q] = UINT32_MAX;
        if (!posted[q]) continue;
        uint32_t l = 0;
        while (l < nleads && !(psize[pleads[l]] < POSTED_GROUP &&
                               same_categories(qfilt[pleads[l]], qfilt[q])))
            l++;
        if (l < nleads) { /* joins the group of query pleads[l] */
            const uint32_t lq = pleads[l];
            pnext[ptail[lq]] = q;
            ptail[lq] = q;
            psize[lq]++;
        } else {
            pleads[nleads++] = q;
            plead[q] = true;
            ptail[q] = q;
            psize[q] = 1;
        }
    }
    for (uint32_t q = 0; q < nq; q++)
        fam[q] = head[q] = UINT32_MAX;
    for (uint32_t q = 0; q < nq; q++) {
        if (posted[q]) continue;
        uint32_t p = s->same_as && s->same_as[q] < q ? s->same_as[q] : q;
        if (head[p] == UINT32_MAX) {
            head[p] = q;
            phys[np++] = q;
            continue;
        }
        uint32_t last = head[p]; /* append q to its family, keeping query order */
        while (fam[last] != UINT32_MAX)
            last = fam[last];
        fam[last] = q;
    }
    for (uint32_t q = 0; q < nq && t->block_cats && !qcats; q++)
        if (!posted[q] && filter_cats(qfilt[q]) != ~(uint64_t)0) {
            qcats = aff_scratch_array(scratch, np, sizeof *qcats);
            mcats = aff_scratch_array(scratch, nq, sizeof *mcats);
            if (!qcats || !mcats) {
                rc = aff__fail(err, AFF_ENOMEM, "out of memory for a batch of %u queries", nq);
                goto out;
            }
            for (uint32_t m = 0; m < nq; m++)
                mcats[m] = filter_cats(qfilt[m]);
            for (uint32_t pi = 0; pi < np; pi++) { /* the restricted queries' categories */
                qcats[pi] = 0;
                for (uint32_t m = phys[pi]; m != UINT32_MAX; m = fam[m])
                    if (mcats[m] != ~(uint64_t)0) qcats[pi] |= mcats[m];
            }
        }
    /* Per scanned vector: the one capped query whose category floors the kernel applies
     * (UINT32_MAX: none) and the categories its other queries may take (floor_rules). */
    uint32_t *floor_q = aff_scratch_array(scratch, np ? np : 1, sizeof *floor_q);
    uint64_t *floor_keep = aff_scratch_array(scratch, np ? np : 1, sizeof *floor_keep);
    if (!floor_q || !floor_keep) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory for a batch of %u queries", nq);
        goto out;
    }
    for (uint32_t pi = 0; pi < np; pi++)
        floor_q[pi] = floor_rules(s, qfilt, fam, phys[pi], table_cats(t) != NULL, &floor_keep[pi]);
    for (size_t i = 0; i < (size_t)nthreads * nq; i++) {
        qstate *st = &states[i];
        st->cap = 2 * s->k[i % nq] + 64;
        st->per_cat = s->max_per_category ? s->max_per_category[i % nq] : 0;
        st->qv = s->queries + (size_t)(i % nq) * dim;
        st->f_attrs = qfilt[i % nq] && backend_filter_tests_attrs(qfilt[i % nq]);
        st->c = aff_scratch_array(scratch, st->cap, sizeof *st->c);
        if (!st->c || (st->per_cat ? topk_init_tagged : topk_init)(&st->lo, s->k[i % nq],
                                                                    scratch) != AFF_OK) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory for candidate lists");
            goto out;
        }
    }
    for (uint32_t q = 0; q < nq; q++)
        if ((s->max_per_category && s->max_per_category[q] ? topk_init_tagged : topk_init)(
                &exact[q], s->k[q], scratch) != AFF_OK) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory for re-ranking heaps");
            goto out;
        }
    for (uint32_t pi = 0; pi < np; pi++)
        query_prepare(c, &kd, s->queries + (size_t)phys[pi] * dim, &qc[pi],
                      qpack + (size_t)pi * steps, qf + (size_t)pi * steps * 2);
    if (kd.wide && !(qwide = widen(qpack, (size_t)np * steps, scratch))) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory for %u queries", nq);
        goto out;
    }

    atomic_int failed = 0;
    uint64_t reported = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : reported) if (np > 0)
    if (np > 0) {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        const uint32_t b_lo = (uint32_t)((uint64_t)nblocks * tid / nt);
        const uint32_t b_hi = (uint32_t)((uint64_t)nblocks * (tid + 1) / nt);
        qstate *mine = states + (size_t)tid * nq;
        take_ctx tc = {
            .t = t,
            .states = mine,
            .phys = phys,
            .next = fam,
            .mcats = mcats,
            .filters = qfilt,
            .cats = table_cats(t)};
        float thresh[GROUP], thresh_cat[GROUP];
        /* Short first tiles: until L exists every row is reported and a stale L reports many,
         * so tiles start at about 2k rows and double up to the full tile while L rises. */
        uint32_t step = first_tile;
        for (uint32_t b0 = b_lo; b0 < b_hi && !atomic_load(&failed);
             b0 += step, step = 2 * step < tile ? 2 * step : tile) {
            const uint32_t nb = b_hi - b0 < step ? b_hi - b0 : step;
            for (uint32_t g0 = 0; g0 < np; g0 += GROUP) {
                const uint32_t gq = np - g0 < GROUP ? np - g0 : GROUP;
                tc.g0 = g0;
                scan_args a = {.c = c,
                               .block0 = b0,
                               .nblocks = nb,
                               .qpack = qpack + (size_t)g0 * steps,
                               .qf = qf + (size_t)g0 * steps * 2,
                               .qwide = qwide ? qwide + (size_t)g0 * steps * 8 : NULL,
                               .qc = qc + g0,
                               .nq = gq,
                               .thresh = thresh,
                               .sq_norms = t->sq_norms,
                               .limit = t->count,
                               .sink = &tc,
                               .block_cats = t->block_cats,
                               .qcats = qcats ? qcats + g0 : NULL,
                               .attrs = t->attrs,
                               .cats = tc.cats,
                               .thresh_cat = thresh_cat};
                for (uint32_t q = 0; q < gq; q++) {
                    set_thresholds(&tc, &a, q);
                    const uint32_t fq = floor_q[g0 + q];
                    if (fq == UINT32_MAX) continue;
                    a.floor_cat[q] = mine[fq].full_cat;
                    a.floor_val[q] = mine[fq].full_floor;
                    a.floor_keep[q] = floor_keep[g0 + q];
                    a.floors = true;
                    for (uint32_t h = 0; h < QSTATE_HOT && mine[fq].hot_cat[h] &&
                                         a.hot_n[q] < SCAN_HOT;
                         h++)
                        if (!(backend_tag_bit(mine[fq].hot_cat[h]) & a.floor_keep[q])) {
                            a.hot_cat[q][a.hot_n[q]] = mine[fq].hot_cat[h];
                            a.hot_floor[q][a.hot_n[q]++] = mine[fq].hot_floor[h];
                        }
                }
                kd.scan(&a);
                reported += a.nhits;
                if (tc.failed) atomic_store(&failed, 1);
            }
        }
    }
    if (atomic_load(&failed)) {
        rc = aff__fail(err, AFF_ENOMEM, "out of memory for candidate lists");
        goto out;
    }

    /* Re-rank: the fp32 scores of every candidate whose upper bound reaches the final L. */
    uint64_t reranked = 0, read = 0;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic) reduction(+ : reranked, read)
    for (uint32_t q = 0; q < nq; q++) {
        if (posted[q] && !plead[q]) continue; /* its group's first query answers it */
        if (posted[q])
            read += search_posted(t, s, qfilt, pnext, q, exact);
        else
            reranked += rerank(t, states, (uint32_t)nthreads, nq, q, s->queries + (size_t)q * dim,
                               &exact[q]);
        for (uint32_t g = q; g != UINT32_MAX; g = posted[q] ? pnext[g] : UINT32_MAX) {
            const uint32_t n = topk_sort(&exact[g]);
            const float shift = t->sq_norms ? -cpu_sq_norm(s->queries + (size_t)g * dim, dim) : 0.0f;
            for (uint32_t i = 0; i < n; i++) {
                s->out_rows[offsets[g] + i] = exact[g].rows[i];
                s->out_scores[offsets[g] + i] = exact[g].scores[i] + shift;
            }
            s->out_counts[g] = n;
        }
    }
    if (stats) {
        stats->candidates = reranked;
        stats->reported = reported;
        stats->posted = read;
    }
out:
    if (states)
        for (size_t i = 0; i < (size_t)nthreads * nq; i++)
            if (states[i].c_owned) free(states[i].c);
    aff_scratch_destroy(tmp);
    return rc;
}
