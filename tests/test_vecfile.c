/* vecfile (.npy/.fvecs), attrfile (CSV/JSONL) and jsonv against hand-made files, including
 * files written by NumPy itself when Debian's python3-numpy is present. */
#include "vecfile.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attrfile.h"
#include "jsonv.h"

static char tmpdir[256];

static void make_tmpdir(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/aff_test_vecfile_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void remove_tmpdir(void)
{
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    cr_assert_eq(system(cmd), 0);
}

static const char *tmp_path(const char *name)
{
    static char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    return path;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void write_text(const char *path, const char *text)
{
    write_bytes(path, text, strlen(text));
}

TestSuite(vecfile, .init = make_tmpdir, .fini = remove_tmpdir);

Test(vecfile, npy_and_fvecs_round_trip)
{
    const char *names[] = {"a.npy", "a.fvecs"};
    float data[7 * 5];
    for (int i = 0; i < 35; i++)
        data[i] = (float)i * 0.5f - 3.0f;
    for (int f = 0; f < 2; f++) {
        aff_err err = {0};
        cr_assert_eq(vecfile_write(tmp_path(names[f]), data, 7, 5, &err), AFF_OK, "%s", err.msg);
        vecfile_reader *r;
        cr_assert_eq(vecfile_open(&r, tmp_path(names[f]), &err), AFF_OK, "%s", err.msg);
        cr_assert_eq(vecfile_rows(r), 7);
        cr_assert_eq(vecfile_dim(r), 5);
        /* Chunks of 3 rows: 3, 3, 1, then the end. */
        float buf[3 * 5];
        size_t n, total = 0;
        for (;;) {
            cr_assert_eq(vecfile_read(r, buf, 3, &n, &err), AFF_OK, "%s", err.msg);
            if (n == 0) break;
            cr_assert(n == 3 || (total == 6 && n == 1));
            cr_assert_arr_eq(buf, data + total * 5, n * 5 * sizeof(float));
            total += n;
        }
        cr_assert_eq(total, 7);
        vecfile_close(r);
        float *all;
        uint64_t rows;
        uint32_t dim;
        cr_assert_eq(vecfile_load(tmp_path(names[f]), &all, &rows, &dim, &err), AFF_OK);
        cr_assert(rows == 7 && dim == 5);
        cr_assert_arr_eq(all, data, sizeof(data));
        free(all);
    }
    vecfile_close(NULL);
}

Test(vecfile, npy_header_is_aligned_and_numpy_reads_it)
{
    float data[2 * 3] = {1, 2, 3, 4, 5, 6};
    aff_err err = {0};
    cr_assert_eq(vecfile_write(tmp_path("b.npy"), data, 2, 3, &err), AFF_OK);
    FILE *f = fopen(tmp_path("b.npy"), "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    cr_assert_eq((size - 24) % 64, 0, "data must start at a multiple of 64 bytes");
    if (access("/usr/bin/python3", X_OK) != 0 ||
        system("/usr/bin/python3 -c 'import numpy' 2>/dev/null") != 0)
        cr_skip_test("python3-numpy not installed; NumPy compatibility not checked");
    char cmd[1024];
    /* tmp_path's buffer is static: build the second name separately. */
    char out[512];
    snprintf(out, sizeof(out), "%s/np.npy", tmpdir);
    snprintf(cmd, sizeof(cmd),
             "/usr/bin/python3 -c \"import numpy as np; a=np.load('%s/b.npy'); "
             "assert a.shape==(2,3) and a.dtype==np.float32 and a[1,2]==6; "
             "np.save('%s', np.arange(12, dtype='<f4').reshape(4,3))\"",
             tmpdir, out);
    cr_assert_eq(system(cmd), 0);
    float *all;
    uint64_t rows;
    uint32_t dim;
    cr_assert_eq(vecfile_load(out, &all, &rows, &dim, &err), AFF_OK, "%s", err.msg);
    cr_assert(rows == 4 && dim == 3);
    for (int i = 0; i < 12; i++)
        cr_assert_float_eq(all[i], (float)i, 0);
    free(all);
}

static void npy_with_header(const char *path, const char *dict, size_t data_bytes)
{
    char buf[512];
    size_t hl = strlen(dict);
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (char)(hl & 0xff);
    buf[9] = (char)(hl >> 8);
    memcpy(buf + 10, dict, hl);
    memset(buf + 10 + hl, 0, data_bytes);
    write_bytes(path, buf, 10 + hl + data_bytes);
}

Test(vecfile, rejects_bad_files_with_a_reason)
{
    aff_err err = {0};
    vecfile_reader *r = NULL;
    cr_assert_eq(vecfile_open(&r, tmp_path("missing.npy"), &err), AFF_EIO);
    cr_assert_eq(vecfile_open(&r, tmp_path("x.bin"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, ".npy or .fvecs"));
    write_text(tmp_path("t.npy"), "not numpy at all");
    cr_assert_eq(vecfile_open(&r, tmp_path("t.npy"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "magic"));
    npy_with_header(tmp_path("f8.npy"),
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }\n", 16);
    cr_assert_eq(vecfile_open(&r, tmp_path("f8.npy"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "'<f8'") && strstr(err.msg, "float32"), "%s", err.msg);
    npy_with_header(tmp_path("fo.npy"),
                    "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2), }\n", 8);
    cr_assert_eq(vecfile_open(&r, tmp_path("fo.npy"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "C order"));
    npy_with_header(tmp_path("1d.npy"),
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }\n", 16);
    cr_assert_eq(vecfile_open(&r, tmp_path("1d.npy"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "2-D"));
    npy_with_header(tmp_path("short.npy"),
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }\n", 8);
    cr_assert_eq(vecfile_open(&r, tmp_path("short.npy"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "truncated"));
    /* fvecs: rows of different dimensions. */
    unsigned char fv[4 + 8 + 4 + 4];
    int32_t d2 = 2, d1 = 1;
    float x = 1.0f;
    memcpy(fv, &d2, 4);
    memcpy(fv + 4, &x, 4);
    memcpy(fv + 8, &x, 4);
    memcpy(fv + 12, &d1, 4);
    memcpy(fv + 16, &x, 4);
    write_bytes(tmp_path("mixed.fvecs"), fv, 20);
    cr_assert_eq(vecfile_open(&r, tmp_path("mixed.fvecs"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "multiple of the row size"), "%s", err.msg);
    cr_assert_null(r);
}

/* ---- attrfile ------------------------------------------------------------------------------ */

Test(vecfile, attrfile_csv_columns_quotes_tags)
{
    write_text(tmp_path("a.csv"), "price,id,extra,tags,available,category\n"
                                  "9.5,item-1,zzz,red|blue,false,shoes\n"
                                  "\n"
                                  "1,\"item,2\",,,,\"big \"\"boots\"\"\"\n"
                                  "2,item-3,,a;b;c,1,\n");
    aff_err err = {0};
    attrfile_reader *r;
    cr_assert_eq(attrfile_open(&r, tmp_path("a.csv"), &err), AFF_OK, "%s", err.msg);
    item_record rec;
    cr_assert_eq(attrfile_next(r, &rec, &err), 1, "%s", err.msg);
    cr_assert_str_eq(rec.id, "item-1");
    cr_assert_str_eq(rec.category, "shoes");
    cr_assert_eq(rec.n_tags, 2);
    cr_assert_str_eq(rec.tags[1], "blue");
    cr_assert_float_eq(rec.price, 9.5f, 1e-6);
    cr_assert_not(rec.available);
    cr_assert_eq(attrfile_next(r, &rec, &err), 1, "%s", err.msg);
    cr_assert_str_eq(rec.id, "item,2");
    cr_assert_str_eq(rec.category, "big \"boots\"");
    cr_assert_eq(rec.n_tags, 0);
    cr_assert(rec.available);
    cr_assert_eq(attrfile_line(r), 4);
    cr_assert_eq(attrfile_next(r, &rec, &err), 1);
    cr_assert_eq(rec.n_tags, 3);
    cr_assert_eq(attrfile_next(r, &rec, &err), 0);
    attrfile_close(r);
}

Test(vecfile, attrfile_jsonl_and_errors_name_the_line)
{
    write_text(tmp_path("a.jsonl"),
               "{\"id\": \"item-\\u00e9\", \"category\": \"c\", \"tags\": [\"x\", \"y\"], "
               "\"price\": 3.25, \"available\": false, \"other\": {\"deep\": [1, 2]}}\n"
               "{\"id\": 17}\n"
               "{\"category\": \"no id\"}\n");
    aff_err err = {0};
    attrfile_reader *r;
    cr_assert_eq(attrfile_open(&r, tmp_path("a.jsonl"), &err), AFF_OK);
    item_record rec;
    cr_assert_eq(attrfile_next(r, &rec, &err), 1, "%s", err.msg);
    cr_assert_str_eq(rec.id, "item-\xc3\xa9");
    cr_assert_eq(rec.n_tags, 2);
    cr_assert_float_eq(rec.price, 3.25f, 0);
    cr_assert_not(rec.available);
    cr_assert_eq(attrfile_next(r, &rec, &err), 1, "%s", err.msg);
    cr_assert_str_eq(rec.id, "17");
    cr_assert_eq(attrfile_next(r, &rec, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "a.jsonl:3") && strstr(err.msg, "id"), "%s", err.msg);
    attrfile_close(r);

    write_text(tmp_path("noid.csv"), "name,price\nx,1\n");
    cr_assert_eq(attrfile_open(&r, tmp_path("noid.csv"), &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "'id'"));
    write_text(tmp_path("bad.csv"), "id,price,available\na,abc,true\n");
    cr_assert_eq(attrfile_open(&r, tmp_path("bad.csv"), &err), AFF_OK);
    cr_assert_eq(attrfile_next(r, &rec, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "bad.csv:2") && strstr(err.msg, "price"), "%s", err.msg);
    attrfile_close(r);
    write_text(tmp_path("tags.csv"), "id,tags\na,1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17\n");
    cr_assert_eq(attrfile_open(&r, tmp_path("tags.csv"), &err), AFF_OK);
    cr_assert_eq(attrfile_next(r, &rec, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "too many tags"));
    attrfile_close(r);
}

/* ---- jsonv --------------------------------------------------------------------------------- */

Test(vecfile, jsonv_parses_values_and_rejects_garbage)
{
    const char *text = " {\"a\": [1, -2.5e3, true, false, null, \"s\\\"\\n\\ud83d\\ude00\"], "
                       "\"b\": {}, \"a2\": []} ";
    jsonv *v;
    aff_err err = {0};
    cr_assert_eq(jsonv_parse(text, strlen(text), &v, &err), AFF_OK, "%s", err.msg);
    const jsonv *a = jsonv_get(v, "a");
    cr_assert_eq(a->n, 6);
    cr_assert_float_eq(jsonv_at(a, 1)->number, -2500.0, 0);
    cr_assert(jsonv_at(a, 2)->boolean);
    cr_assert_eq(jsonv_at(a, 4)->type, JSONV_NULL);
    cr_assert_str_eq(jsonv_at(a, 5)->string, "s\"\n\xf0\x9f\x98\x80");
    cr_assert_null(jsonv_at(a, 6));
    cr_assert_eq(jsonv_get(v, "b")->type, JSONV_OBJECT);
    cr_assert_null(jsonv_get(v, "zz"));
    jsonv_free(v);
    const char *bad[] = {"", "{", "[1,]", "{\"a\" 1}", "\"abc", "tru", "{} x", "[01x]"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        v = NULL;
        cr_assert_eq(jsonv_parse(bad[i], strlen(bad[i]), &v, &err), AFF_EINVAL, "%s", bad[i]);
        cr_assert_null(v);
    }
    char deep[200];
    memset(deep, '[', 100);
    memset(deep + 100, ']', 100);
    cr_assert_eq(jsonv_parse(deep, 200, &v, &err), AFF_EINVAL);
    jsonv_free(NULL);
}
