/*
 * topk.c: the heap operations behind topk.h.
 */
#include "topk.h"

#include "affinity/affinity.h"

int topk_init(topk_heap *h, uint32_t k, aff_scratch *scratch)
{
    h->k = k ? k : 1;
    h->n = 0;
    h->scores = aff_scratch_array(scratch, h->k, sizeof *h->scores);
    h->rows = aff_scratch_array(scratch, h->k, sizeof *h->rows);
    h->tags = NULL;
    return h->scores && h->rows ? AFF_OK : AFF_ENOMEM;
}

int topk_init_tagged(topk_heap *h, uint32_t k, aff_scratch *scratch)
{
    int rc = topk_init(h, k, scratch);
    if (rc != AFF_OK) return rc;
    h->tags = aff_scratch_array(scratch, h->k, sizeof *h->tags);
    return h->tags ? AFF_OK : AFF_ENOMEM;
}

/* Worst-at-top heap: parent is worse than (or equal to) its children. t: the tags or NULL
 * (each caller passes a constant or the heap's own, so the untagged path carries no moves). */
static inline __attribute__((always_inline)) void sift_down_t(float *s, uint32_t *r, uint32_t *t,
                                                              uint32_t n, uint32_t i)
{
    float sv = s[i];
    uint32_t rv = r[i], tv = t ? t[i] : 0;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && topk_better(s[c], r[c], s[c + 1], r[c + 1]))
            c++; /* pick the worse child */
        if (!topk_better(sv, rv, s[c], r[c])) break;
        s[i] = s[c];
        r[i] = r[c];
        if (t) t[i] = t[c];
        i = c;
    }
    s[i] = sv;
    r[i] = rv;
    if (t) t[i] = tv;
}

static void sift_down(float *s, uint32_t *r, uint32_t n, uint32_t i)
{
    sift_down_t(s, r, NULL, n, i);
}

static void sift_down_tagged(float *s, uint32_t *r, uint32_t *t, uint32_t n, uint32_t i)
{
    sift_down_t(s, r, t, n, i);
}

static inline __attribute__((always_inline)) void sift_up_t(float *s, uint32_t *r, uint32_t *t,
                                                            uint32_t i)
{
    float sv = s[i];
    uint32_t rv = r[i], tv = t ? t[i] : 0;
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (!topk_better(s[p], r[p], sv, rv)) break;
        s[i] = s[p];
        r[i] = r[p];
        if (t) t[i] = t[p];
        i = p;
    }
    s[i] = sv;
    r[i] = rv;
    if (t) t[i] = tv;
}

void topk_push(topk_heap *h, float score, uint32_t row)
{
    if (h->tags) {
        topk_push_tagged(h, score, row, 0);
        return;
    }
    if (!topk_would_accept(h, score, row)) return;
    if (h->n < h->k) {
        h->scores[h->n] = score;
        h->rows[h->n] = row;
        sift_up_t(h->scores, h->rows, NULL, h->n++);
    } else {
        h->scores[0] = score;
        h->rows[0] = row;
        sift_down(h->scores, h->rows, h->n, 0);
    }
}

void topk_push_tagged(topk_heap *h, float score, uint32_t row, uint32_t tag)
{
    if (!h->tags) {
        topk_push(h, score, row);
        return;
    }
    if (!topk_would_accept(h, score, row)) return;
    const uint32_t i = h->n < h->k ? h->n : 0;
    h->scores[i] = score;
    h->rows[i] = row;
    h->tags[i] = tag;
    if (h->n < h->k)
        sift_up_t(h->scores, h->rows, h->tags, h->n++);
    else
        sift_down_tagged(h->scores, h->rows, h->tags, h->n, 0);
}

void topk_replace(topk_heap *h, uint32_t i, float score, uint32_t row, uint32_t tag)
{
    h->scores[i] = score;
    h->rows[i] = row;
    if (h->tags) { /* it got better: it can only move down */
        h->tags[i] = tag;
        sift_down_tagged(h->scores, h->rows, h->tags, h->n, i);
    } else {
        sift_down(h->scores, h->rows, h->n, i);
    }
}

void topk_merge(topk_heap *dst, const topk_heap *src)
{
    for (uint32_t i = 0; i < src->n; i++)
        topk_push(dst, src->scores[i], src->rows[i]);
}

uint32_t topk_sort(topk_heap *h)
{
    /* Heap sort: repeatedly move the worst to the end, leaving the best first. */
    uint32_t n = h->n;
    uint32_t *t = h->tags;
    for (uint32_t end = n; end > 1; end--) {
        float s = h->scores[0];
        uint32_t r = h->rows[0];
        h->scores[0] = h->scores[end - 1];
        h->rows[0] = h->rows[end - 1];
        h->scores[end - 1] = s;
        h->rows[end - 1] = r;
        if (t) {
            uint32_t tv = t[0];
            t[0] = t[end - 1];
            t[end - 1] = tv;
            sift_down_tagged(h->scores, h->rows, t, end - 1, 0);
        } else {
            sift_down(h->scores, h->rows, end - 1, 0);
        }
    }
    return n;
}

void topk_sort_pairs(float *scores, uint32_t *rows, uint32_t n)
{
    /* Insertion sort: the inputs are short (≤ AFF_MAX_K) and usually nearly sorted. */
    for (uint32_t i = 1; i < n; i++) {
        float s = scores[i];
        uint32_t r = rows[i];
        uint32_t j = i;
        while (j > 0 && topk_better(s, r, scores[j - 1], rows[j - 1])) {
            scores[j] = scores[j - 1];
            rows[j] = rows[j - 1];
            j--;
        }
        scores[j] = s;
        rows[j] = r;
    }
}
