/*
 * test_tablefile.c: the record-file layer shared by the attribute and event readers: format
 * by extension, the CSV header (order, case, spaces, byte order mark, required columns), the
 * splitter, blank lines, line numbers, and short rows.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "affinity/affinity.h"
#include "tablefile.h"

static const char *const cols[] = {"user_id", "item_id", "type", "value"};

static char dir[64];

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/aff-tablefile-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(tablefile, .init = setup, .fini = teardown);

static const char *write_file(const char *name, const char *text)
{
    static char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

Test(tablefile, format_follows_the_extension)
{
    bool jsonl = true;
    aff_err err;
    cr_assert_eq(tablefile_format("a/b.CSV", "event", "hint", &jsonl, &err), AFF_OK);
    cr_assert_eq(jsonl, false);
    cr_assert_eq(tablefile_format("b.ndjson", "event", "hint", &jsonl, &err), AFF_OK);
    cr_assert_eq(jsonl, true);
    cr_assert_eq(tablefile_format("b.txt", "event", "use .csv", &jsonl, &err), AFF_EINVAL);
    cr_assert_str_eq(err.msg, "b.txt: unknown event file type; use .csv");
}

Test(tablefile, header_maps_columns_in_any_order_and_case)
{
    const char *path = write_file("e.csv", "\xef\xbb\xbf Type ,extra,USER_ID,item_id\r\n"
                                           "\n"
                                           "view,x,\"u, 1\",i1\r\n"
                                           "  \t \n"
                                           "\"say \"\"hi\"\"\",y,u2,i2\n");
    tablefile t;
    aff_err err;
    cr_assert_eq(tablefile_open(&t, path, false, cols, 4, 3, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(t.col_of[0], 2);
    cr_assert_eq(t.col_of[1], 3);
    cr_assert_eq(t.col_of[2], 0);
    cr_assert_eq(t.col_of[3], -1, "value is optional and absent");
    const char *val[4];
    cr_assert_eq(tablefile_next_line(&t, &err), 1);
    cr_assert_eq(t.line_no, 3, "the blank line 2 is skipped");
    cr_assert_eq(tablefile_csv_row(&t, val, 4, &err), AFF_OK);
    cr_assert_str_eq(val[0], "u, 1");
    cr_assert_str_eq(val[1], "i1");
    cr_assert_str_eq(val[2], "view");
    cr_assert_str_eq(val[3], "");
    cr_assert_eq(tablefile_next_line(&t, &err), 1);
    cr_assert_eq(t.line_no, 5);
    cr_assert_eq(tablefile_csv_row(&t, val, 4, &err), AFF_OK);
    cr_assert_str_eq(val[2], "say \"hi\"");
    cr_assert_eq(tablefile_next_line(&t, &err), 0);
    tablefile_close(&t);
}

Test(tablefile, a_missing_required_column_names_every_column)
{
    const char *path = write_file("e.csv", "user_id,type\nu,view\n");
    tablefile t;
    aff_err err;
    cr_assert_eq(tablefile_open(&t, path, false, cols, 4, 3, &err), AFF_EINVAL);
    char want[256];
    snprintf(want, sizeof want,
             "%s:1: the header has no 'item_id' column; columns are user_id, item_id, type, value",
             path);
    cr_assert_str_eq(err.msg, want);
    path = write_file("empty.csv", "");
    cr_assert_eq(tablefile_open(&t, path, false, cols, 4, 3, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "empty file; a CSV header line is required"), "%s", err.msg);
}

Test(tablefile, short_and_malformed_rows_are_reported)
{
    const char *path = write_file("e.csv", "type,user_id,item_id\nview,u\nview,\"u,i\n");
    tablefile t;
    aff_err err;
    const char *val[4];
    cr_assert_eq(tablefile_open(&t, path, false, cols, 4, 3, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(tablefile_next_line(&t, &err), 1);
    cr_assert_eq(tablefile_csv_row(&t, val, 4, &err), AFF_EINVAL);
    cr_assert_str_eq(err.msg, "2 fields; the header needs at least 3");
    cr_assert_eq(tablefile_next_line(&t, &err), 1);
    cr_assert_eq(tablefile_csv_row(&t, val, 4, &err), AFF_EINVAL);
    cr_assert(strstr(err.msg, "unbalanced quotes"), "%s", err.msg);
    tablefile_close(&t);
}

Test(tablefile, json_lines_have_no_header_and_count_bytes)
{
    const char *path = write_file("e.jsonl", "{\"a\":1}\n\n{\"b\":2}\n");
    tablefile t;
    aff_err err;
    cr_assert_eq(tablefile_open(&t, path, true, cols, 4, 3, &err), AFF_OK, "%s", err.msg);
    cr_assert_eq(t.size, 17);
    cr_assert_eq(tablefile_next_line(&t, &err), 1);
    cr_assert_str_eq(t.line, "{\"a\":1}");
    cr_assert_eq(tablefile_next_line(&t, &err), 1);
    cr_assert_str_eq(t.line, "{\"b\":2}");
    cr_assert_eq(t.line_no, 3);
    cr_assert_eq(t.offset, 17);
    cr_assert_eq(tablefile_next_line(&t, &err), 0);
    tablefile_close(&t);
    cr_assert_eq(tablefile_open(&t, "/nonexistent/x.jsonl", true, cols, 4, 3, &err), AFF_EIO);
}
