/*
 * transport_reflection.c: owns gRPC server reflection. Every answer comes from the embedded
 * FileDescriptorSet (transport__descriptor_set), read on each request with the wire reader of
 * transport_codec.c: no copy of the descriptors and no state outside the call.
 *
 * Answers: list_services (every service of every served file), file_by_filename and
 * file_containing_symbol (the file, then its imports, transitively, each once),
 * file_containing_extension and all_extension_numbers_of_type (this API defines no
 * extensions: NOT_FOUND and an empty list). Requests are answered one at a time, in order;
 * the stream ends OK when the client half-closes.
 */
#include "transport_reflection.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/reflection/v1/reflection.pb-c.h"
#include "transport_codec.h"

#define MAX_FILES             32  /* files in one answer (ours: 6) */
#define MAX_NAME              512 /* longest fully-qualified symbol considered */
#define GRPC_NOT_FOUND        5
#define GRPC_INVALID_ARGUMENT 3

typedef struct span {
    const uint8_t *p;
    size_t n;
} span;

static bool span_eq(span s, const char *str)
{
    return s.n == strlen(str) && memcmp(s.p, str, s.n) == 0;
}

/* The first length-delimited field `number` of msg (empty when absent). */
static span field_bytes(span msg, uint32_t number)
{
    const uint8_t *p = msg.p, *end = msg.p + msg.n, *data;
    uint32_t num;
    unsigned wt;
    size_t len;
    while (p < end && transport__wire_next(&p, end, &num, &wt, &data, &len))
        if (num == number && wt == 2) return (span){data, len};
    return (span){NULL, 0};
}

/* Calls fn for each length-delimited field `number` of msg; stops when fn returns true. */
static bool each_field(span msg, uint32_t number, bool (*fn)(span v, void *ctx), void *ctx)
{
    const uint8_t *p = msg.p, *end = msg.p + msg.n, *data;
    uint32_t num;
    unsigned wt;
    size_t len;
    while (p < end && transport__wire_next(&p, end, &num, &wt, &data, &len))
        if (num == number && wt == 2 && fn((span){data, len}, ctx)) return true;
    return false;
}

static span descriptor_set(void)
{
    return (span){transport__descriptor_set, transport__descriptor_set_len};
}

/* ---- finding files ---------------------------------------------------------------------- */

typedef struct find_ctx {
    const char *want; /* a file name or a fully-qualified symbol */
    char prefix[MAX_NAME];
    span found;
} find_ctx;

static bool file_named(span file, void *arg)
{
    find_ctx *f = arg;
    if (!span_eq(field_bytes(file, 1), f->want)) return false;
    f->found = file;
    return true;
}

/* Does `scope.name` (name = field 1 of v) equal the symbol? */
static bool names_symbol(const char *scope, span name, const char *symbol)
{
    size_t ls = strlen(scope);
    if (ls && (strncmp(symbol, scope, ls) != 0 || symbol[ls] != '.')) return false;
    const char *rest = symbol + (ls ? ls + 1 : 0);
    return span_eq(name, rest);
}

typedef struct sym_ctx {
    const char *symbol;
    char scope[MAX_NAME];
} sym_ctx;

static bool message_defines(span msg, void *arg);

static bool enum_defines(span e, void *arg)
{
    sym_ctx *s = arg;
    return names_symbol(s->scope, field_bytes(e, 1), s->symbol);
}

/* A DescriptorProto: its own name, nested messages (3) and enums (4). */
static bool message_defines(span msg, void *arg)
{
    sym_ctx *s = arg;
    span name = field_bytes(msg, 1);
    if (names_symbol(s->scope, name, s->symbol)) return true;
    sym_ctx inner = {.symbol = s->symbol};
    int n = snprintf(inner.scope, sizeof inner.scope, "%s%s%.*s", s->scope, s->scope[0] ? "." : "",
                     (int)name.n, (const char *)name.p);
    if (n < 0 || (size_t)n >= sizeof inner.scope) return false;
    return each_field(msg, 3, message_defines, &inner) || each_field(msg, 4, enum_defines, &inner);
}

static bool method_defines(span m, void *arg)
{
    return enum_defines(m, arg); /* same shape: name is field 1 */
}

/* A ServiceDescriptorProto: its name and its methods (2), as "pkg.Service.Method". */
static bool service_defines(span svc, void *arg)
{
    sym_ctx *s = arg;
    span name = field_bytes(svc, 1);
    if (names_symbol(s->scope, name, s->symbol)) return true;
    sym_ctx inner = {.symbol = s->symbol};
    int n = snprintf(inner.scope, sizeof inner.scope, "%s%s%.*s", s->scope, s->scope[0] ? "." : "",
                     (int)name.n, (const char *)name.p);
    if (n < 0 || (size_t)n >= sizeof inner.scope) return false;
    return each_field(svc, 2, method_defines, &inner);
}

/* A FileDescriptorProto defines the symbol: messages (4), enums (5), services (6). */
static bool file_defines(span file, void *arg)
{
    find_ctx *f = arg;
    span pkg = field_bytes(file, 2);
    sym_ctx s = {.symbol = f->want};
    int n = snprintf(s.scope, sizeof s.scope, "%.*s", (int)pkg.n, (const char *)pkg.p);
    if (n < 0 || (size_t)n >= sizeof s.scope) return false;
    if (each_field(file, 4, message_defines, &s) || each_field(file, 5, enum_defines, &s) ||
        each_field(file, 6, service_defines, &s)) {
        f->found = file;
        return true;
    }
    return false;
}

/* ---- answers ------------------------------------------------------------------------------ */

typedef struct file_list {
    ProtobufCBinaryData files[MAX_FILES];
    size_t n;
} file_list;

static bool already(const file_list *l, span file)
{
    for (size_t i = 0; i < l->n; i++)
        if (l->files[i].data == file.p) return true;
    return false;
}

/* Adds file, then (depth first) every file it imports (field 3), each once. */
static void add_with_deps(file_list *l, span file);

static bool add_dep(span dep_name, void *arg)
{
    file_list *l = arg;
    char name[MAX_NAME];
    int n = snprintf(name, sizeof name, "%.*s", (int)dep_name.n, (const char *)dep_name.p);
    if (n < 0 || (size_t)n >= sizeof name) return false;
    find_ctx f = {.want = name};
    if (each_field(descriptor_set(), 1, file_named, &f)) add_with_deps(l, f.found);
    return false;
}

static void add_with_deps(file_list *l, span file)
{
    if (already(l, file) || l->n == MAX_FILES) return;
    l->files[l->n++] = (ProtobufCBinaryData){.len = file.n, .data = (uint8_t *)file.p};
    each_field(file, 3, add_dep, l);
}

typedef struct service_list {
    char names[MAX_FILES][MAX_NAME];
    Grpc__Reflection__V1__ServiceResponse items[MAX_FILES];
    Grpc__Reflection__V1__ServiceResponse *ptrs[MAX_FILES];
    size_t n;
    char pkg[MAX_NAME];
} service_list;

static bool add_service(span svc, void *arg)
{
    service_list *l = arg;
    if (l->n == MAX_FILES) return true;
    span name = field_bytes(svc, 1);
    int n = snprintf(l->names[l->n], MAX_NAME, "%s%s%.*s", l->pkg, l->pkg[0] ? "." : "",
                     (int)name.n, (const char *)name.p);
    if (n < 0 || n >= MAX_NAME) return false; /* no such names here; skipped */
    grpc__reflection__v1__service_response__init(&l->items[l->n]);
    l->items[l->n].name = l->names[l->n];
    l->ptrs[l->n] = &l->items[l->n];
    l->n++;
    return false;
}

static bool file_services(span file, void *arg)
{
    service_list *l = arg;
    span pkg = field_bytes(file, 2);
    int n = snprintf(l->pkg, sizeof l->pkg, "%.*s", (int)pkg.n, (const char *)pkg.p);
    if (n < 0 || (size_t)n >= sizeof l->pkg) return false;
    return each_field(file, 6, add_service, l);
}

/* Answers one request into resp (strings point into the request, req, or the lists). */
static void answer(const Grpc__Reflection__V1__ServerReflectionRequest *req,
                   Grpc__Reflection__V1__ServerReflectionResponse *resp, file_list *files,
                   service_list *services, Grpc__Reflection__V1__FileDescriptorResponse *fdr,
                   Grpc__Reflection__V1__ListServiceResponse *lsr,
                   Grpc__Reflection__V1__ExtensionNumberResponse *enr,
                   Grpc__Reflection__V1__ErrorResponse *er, char *msg, size_t msg_size)
{
    grpc__reflection__v1__server_reflection_response__init(resp);
    resp->valid_host = req->host;
    resp->original_request = (Grpc__Reflection__V1__ServerReflectionRequest *)req;
    grpc__reflection__v1__error_response__init(er);
    er->error_code = GRPC_NOT_FOUND;
    er->error_message = msg;
    find_ctx f = {0};
    switch (req->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        grpc__reflection__v1__list_service_response__init(lsr);
        each_field(descriptor_set(), 1, file_services, services);
        lsr->n_service = services->n;
        lsr->service = services->ptrs;
        resp->message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        resp->list_services_response = lsr;
        return;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        f.want = req->file_by_filename;
        if (!each_field(descriptor_set(), 1, file_named, &f))
            snprintf(msg, msg_size, "file \"%.200s\" is not served here", f.want);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        f.want = req->file_containing_symbol[0] == '.' ? req->file_containing_symbol + 1
                                                       : req->file_containing_symbol;
        if (!each_field(descriptor_set(), 1, file_defines, &f))
            snprintf(msg, msg_size, "symbol \"%.200s\" is not defined by any served file", f.want);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
        grpc__reflection__v1__extension_number_response__init(enr);
        enr->base_type_name = req->all_extension_numbers_of_type;
        resp->message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
        resp->all_extension_numbers_response = enr;
        return;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
        snprintf(msg, msg_size, "this API defines no extensions");
        break;
    default:
        er->error_code = GRPC_INVALID_ARGUMENT;
        snprintf(msg, msg_size,
                 "the request names no question: set list_services, file_by_filename, "
                 "file_containing_symbol, file_containing_extension or "
                 "all_extension_numbers_of_type");
        break;
    }
    if (f.found.p) {
        add_with_deps(files, f.found);
        grpc__reflection__v1__file_descriptor_response__init(fdr);
        fdr->n_file_descriptor_proto = files->n;
        fdr->file_descriptor_proto = files->files;
        resp->message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
        resp->file_descriptor_response = fdr;
        return;
    }
    resp->message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
    resp->error_response = er;
}

/* ---- the stream ---------------------------------------------------------------------------- */

static void reflection_on_recv(tcall *c, bool ok, grpc_byte_buffer *bb)
{
    if (!ok) {
        if (bb) grpc_byte_buffer_destroy(bb);
        tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke", NULL);
        return;
    }
    if (!bb) { /* the client half-closed: every request was answered */
        tcall_finish(c, 0, NULL, NULL);
        return;
    }
    char why[400];
    Grpc__Reflection__V1__ServerReflectionRequest *req = (void *)transport__unpack_checked(
        bb, &grpc__reflection__v1__server_reflection_request__descriptor, why, sizeof why);
    grpc_byte_buffer_destroy(bb);
    if (!req) {
        char msg[480];
        snprintf(msg, sizeof msg, "the request is not a valid ServerReflectionRequest%s%s",
                 why[0] ? ": " : "", why);
        tcall_finish(c, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
        return;
    }
    file_list *files = calloc(1, sizeof *files);
    service_list *services = calloc(1, sizeof *services);
    bool sent = false;
    if (files && services) {
        Grpc__Reflection__V1__ServerReflectionResponse resp;
        Grpc__Reflection__V1__FileDescriptorResponse fdr;
        Grpc__Reflection__V1__ListServiceResponse lsr;
        Grpc__Reflection__V1__ExtensionNumberResponse enr;
        Grpc__Reflection__V1__ErrorResponse er;
        char msg[400] = "";
        answer(req, &resp, files, services, &fdr, &lsr, &enr, &er, msg, sizeof msg);
        sent = tcall_send(c, &resp.base); /* serialized at once: nothing here is kept */
    }
    free(files);
    free(services);
    protobuf_c_message_free_unpacked(&req->base, NULL);
    if (!sent) tcall_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "cannot send the answer", NULL);
}

static void reflection_on_send(tcall *c, bool ok)
{
    if (!ok) {
        tcall_finish(c, GRPC_STATUS_CANCELLED, "the stream broke", NULL);
        return;
    }
    if (!tcall_recv(c)) tcall_finish(c, GRPC_STATUS_INTERNAL, "cannot read the next request", NULL);
}

void transport__reflection_info(tcall *c)
{
    c->on_recv = reflection_on_recv;
    c->on_send = reflection_on_send;
    if (!tcall_recv(c))
        tcall_finish(c, GRPC_STATUS_INTERNAL, "cannot read the request stream", NULL);
}
