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
    return h->scores && h->rows ? AFF_OK : AFF_ENOMEM;
}

/* Worst-at-top heap: parent is worse than (or equal to) its children. */
static void sift_down(float *s, uint32_t *r, uint32_t n, uint32_t i)
{
    float sv = s[i];
    uint32_t rv = r[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && topk_better(s[c], r[c], s[c + 1], r[c + 1]))
            c++; /* pick the worse child */
        if (!topk_better(sv, rv, s[c], r[c])) break;
        s[i] = s[c];
        r[i] = r[c];
        i = c;
    }
    s[i] = sv;
    r[i] = rv;
}

static void sift_up(float *s, uint32_t *r, uint32_t i)
{
    float sv = s[i];
    uint32_t rv = r[i];
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (!topk_better(s[p], r[p], sv, rv)) break;
        s[i] = s[p];
        r[i] = r[p];
        i = p;
    }
    s[i] = sv;
    r[i] = rv;
}

void topk_push(topk_heap *h, float score, uint32_t row)
{
    if (!topk_would_accept(h, score, row)) return;
    if (h->n < h->k) {
        h->scores[h->n] = score;
        h->rows[h->n] = row;
        sift_up(h->scores, h->rows, h->n++);
    } else {
        h->scores[0] = score;
        h->rows[0] = row;
        sift_down(h->scores, h->rows, h->n, 0);
    }
}

void topk_replace(topk_heap *h, uint32_t i, float score, uint32_t row)
{
    h->scores[i] = score;
    h->rows[i] = row;
    sift_down(h->scores, h->rows, h->n, i); /* it got better: it can only move down */
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
    for (uint32_t end = n; end > 1; end--) {
        float s = h->scores[0];
        uint32_t r = h->rows[0];
        h->scores[0] = h->scores[end - 1];
        h->rows[0] = h->rows[end - 1];
        h->scores[end - 1] = s;
        h->rows[end - 1] = r;
        sift_down(h->scores, h->rows, end - 1, 0);
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
