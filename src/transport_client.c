/*
 * transport_client.c: owns the client channel and the blocking call helpers on gRPC core.
 * Rules kept: every call gets its own pluck completion queue, so calls on one client never
 * wait on each other; every operation batch is plucked before the call is released.
 */
#include "transport_client.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "affinity/v1/affinity.pb-c.h"
#include "transport_codec.h"

struct transport_client {
    grpc_channel *channel;
    char *authorization; /* "Bearer <token>" or NULL */
    uint32_t timeout_ms;
};

struct transport_client_stream {
    transport_client *c;
    grpc_call *call;
    grpc_completion_queue *cq;
    grpc_metadata auth_md;
    grpc_metadata_array initial_md, trailing_md;
    grpc_status_code status;
    grpc_slice details;
    bool got_initial_md, closed_send, finished, recv_ended;
    /* distinct tags for the operations that may be outstanding at once */
    char tag_send, tag_recv, tag_status;
};

int transport_client_status_to_aff(int grpc_code)
{
    switch (grpc_code) {
    case GRPC_STATUS_OK:
        return AFF_OK;
    case GRPC_STATUS_INVALID_ARGUMENT:
    case GRPC_STATUS_OUT_OF_RANGE:
    case GRPC_STATUS_FAILED_PRECONDITION:
        return AFF_EINVAL;
    case GRPC_STATUS_NOT_FOUND:
        return AFF_ENOTFOUND;
    case GRPC_STATUS_ALREADY_EXISTS:
        return AFF_EEXIST;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
        return AFF_EFULL;
    case GRPC_STATUS_DEADLINE_EXCEEDED:
        return AFF_EDEADLINE;
    case GRPC_STATUS_UNAVAILABLE:
        return AFF_EUNAVAILABLE;
    case GRPC_STATUS_UNAUTHENTICATED:
    case GRPC_STATUS_PERMISSION_DENIED:
        return AFF_EUNAUTHENTICATED;
    case GRPC_STATUS_UNIMPLEMENTED:
        return AFF_EUNSUPPORTED;
    case GRPC_STATUS_CANCELLED:
        return AFF_ECANCELLED;
    default:
        return AFF_EINTERNAL;
    }
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    if (!f) return NULL;
    size_t cap = 4096, len = 0, n;
    buf = malloc(cap + 1);
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            char *b2 = realloc(buf, 2 * cap + 1);
            if (!b2) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b2;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf) buf[len] = '\0';
    return buf;
}

int transport_client_create(transport_client **out, const transport_client_options *opts,
                            aff_err *err)
{
    int rc = 0;
    transport_client *c = NULL;
    char *pem = NULL;
    grpc_channel_credentials *creds = NULL;
    *out = NULL;
    if (!opts || !opts->target || !opts->target[0]) {
        rc = aff__fail(err, AFF_EINVAL, "client needs a target host:port");
        goto out;
    }
    grpc_init();
    c = calloc(1, sizeof *c);
    if (!c) {
        grpc_shutdown();
        rc = aff__fail(err, AFF_ENOMEM, "out of memory creating the client");
        goto out;
    }
    c->timeout_ms = opts->timeout_ms ? opts->timeout_ms : 30000;
    if (opts->token && opts->token[0]) {
        size_t n = strlen(opts->token) + 8;
        c->authorization = malloc(n);
        if (!c->authorization) {
            rc = aff__fail(err, AFF_ENOMEM, "out of memory creating the client");
            goto out;
        }
        snprintf(c->authorization, n, "Bearer %s", opts->token);
    }
    int max_msg = opts->max_message_bytes ? (int)opts->max_message_bytes : 64 << 20;
    grpc_arg args[3];
    size_t nargs = 0;
    args[nargs++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                               .key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                               .value.integer = max_msg};
    args[nargs++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                               .key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
                               .value.integer = max_msg};
    if (opts->tls_root_cert_file) {
        pem = read_file(opts->tls_root_cert_file);
        if (!pem) {
            rc = aff__fail(err, AFF_EIO, "cannot read TLS root certificate '%s': %s",
                           opts->tls_root_cert_file, strerror(errno));
            goto out;
        }
        creds = grpc_ssl_credentials_create(pem, NULL, NULL, NULL);
        if (opts->tls_server_name)
            args[nargs++] = (grpc_arg){.type = GRPC_ARG_STRING,
                                       .key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG,
                                       .value.string = (char *)opts->tls_server_name};
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_channel_args ca = {.num_args = nargs, .args = args};
    c->channel = grpc_channel_create(opts->target, creds, &ca);
    if (!c->channel) {
        rc = aff__fail(err, AFF_EINVAL, "cannot create a channel to '%s'", opts->target);
        goto out;
    }
    *out = c;
    c = NULL;
out:
    if (creds) grpc_channel_credentials_release(creds);
    free(pem);
    transport_client_destroy(c);
    return rc;
}

void transport_client_destroy(transport_client *c)
{
    if (!c) return;
    if (c->channel) grpc_channel_destroy(c->channel);
    free(c->authorization);
    free(c);
    grpc_shutdown();
}

void transport_client_free(ProtobufCMessage *msg)
{
    if (msg) protobuf_c_message_free_unpacked(msg, NULL);
}

static gpr_timespec deadline_after(const transport_client *c, uint32_t timeout_ms)
{
    uint32_t ms = timeout_ms ? timeout_ms : c->timeout_ms;
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                        gpr_time_from_millis((int64_t)ms, GPR_TIMESPAN));
}

static bool pluck(grpc_completion_queue *cq, void *tag)
{
    grpc_event ev = grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

static void cq_destroy(grpc_completion_queue *cq)
{
    if (!cq) return;
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
}

static void fill_status(transport_call_status *st, grpc_status_code code, grpc_slice details)
{
    if (!st) return;
    st->code = (int)code;
    size_t n = GRPC_SLICE_LENGTH(details);
    if (n >= sizeof st->message) n = sizeof st->message - 1;
    memcpy(st->message, GRPC_SLICE_START_PTR(details), n);
    st->message[n] = '\0';
}

static void local_status(transport_call_status *st, int grpc_code, const char *msg)
{
    if (!st) return;
    st->code = grpc_code;
    snprintf(st->message, sizeof st->message, "%s", msg);
}

static grpc_call *new_call(transport_client *c, grpc_completion_queue *cq, const char *method,
                           uint32_t timeout_ms)
{
    grpc_slice m = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m,
                                               NULL, deadline_after(c, timeout_ms), NULL);
    grpc_slice_unref(m);
    return call;
}

static void auth_metadata(const transport_client *c, grpc_metadata *md)
{
    md->key = grpc_slice_from_static_string("authorization");
    md->value = grpc_slice_from_static_string(c->authorization ? c->authorization : "");
}

int transport_client_unary(transport_client *c, const char *method, const ProtobufCMessage *req,
                           const ProtobufCMessageDescriptor *resp_desc, uint32_t timeout_ms,
                           ProtobufCMessage **resp, transport_call_status *status)
{
    int rc = 0;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call *call = NULL;
    grpc_byte_buffer *send = NULL, *recv = NULL;
    grpc_metadata_array initial_md, trailing_md;
    grpc_metadata md;
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_metadata_array_init(&initial_md);
    grpc_metadata_array_init(&trailing_md);
    *resp = NULL;

    call = new_call(c, cq, method, timeout_ms);
    send = transport__pack(req);
    if (!call || !send) {
        local_status(status, GRPC_STATUS_INTERNAL, "cannot start the call");
        rc = AFF_EINTERNAL;
        goto out;
    }
    auth_metadata(c, &md);
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->authorization ? 1 : 0;
    ops[0].data.send_initial_metadata.metadata = &md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
    ops[5].data.recv_status_on_client.status = &code;
    ops[5].data.recv_status_on_client.status_details = &details;
    if (grpc_call_start_batch(call, ops, 6, &code, NULL) != GRPC_CALL_OK) {
        local_status(status, GRPC_STATUS_INTERNAL, "cannot start the call's operations");
        rc = AFF_EINTERNAL;
        goto out;
    }
    pluck(cq, &code);
    fill_status(status, code, details);
    rc = transport_client_status_to_aff((int)code);
    if (rc == 0 && resp_desc) {
        *resp = transport__unpack(recv, resp_desc);
        if (!*resp) {
            local_status(status, GRPC_STATUS_INTERNAL, "the response could not be decoded");
            rc = AFF_EINTERNAL;
        }
    }
out:
    if (send) grpc_byte_buffer_destroy(send);
    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&initial_md);
    grpc_metadata_array_destroy(&trailing_md);
    if (call) grpc_call_unref(call);
    cq_destroy(cq);
    return rc;
}

/* ---- streams --------------------------------------------------------------------------- */

int transport_client_stream_open(transport_client *c, const char *method, uint32_t timeout_ms,
                                 transport_client_stream **out, aff_err *err)
{
    int rc = 0;
    transport_client_stream *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) return aff__fail(err, AFF_ENOMEM, "out of memory opening a stream");
    s->c = c;
    s->finished = true; /* until the status operation is pending */
    s->details = grpc_empty_slice();
    grpc_metadata_array_init(&s->initial_md);
    grpc_metadata_array_init(&s->trailing_md);
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    s->call = new_call(c, s->cq, method, timeout_ms);
    if (!s->call) {
        rc = aff__fail(err, AFF_EINTERNAL, "cannot start a call to %s", method);
        goto out;
    }
    auth_metadata(c, &s->auth_md);
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->authorization ? 1 : 0;
    ops[0].data.send_initial_metadata.metadata = &s->auth_md;
    if (grpc_call_start_batch(s->call, ops, 1, &s->tag_send, NULL) != GRPC_CALL_OK) {
        rc = aff__fail(err, AFF_EINTERNAL, "cannot start a call to %s", method);
        goto out;
    }
    pluck(s->cq, &s->tag_send);
    /* The status is received in the background and collected by finish. */
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &s->trailing_md;
    ops[0].data.recv_status_on_client.status = &s->status;
    ops[0].data.recv_status_on_client.status_details = &s->details;
    if (grpc_call_start_batch(s->call, ops, 1, &s->tag_status, NULL) != GRPC_CALL_OK) {
        rc = aff__fail(err, AFF_EINTERNAL, "cannot start a call to %s", method);
        goto out;
    }
    s->finished = false;
    *out = s;
    s = NULL;
out:
    transport_client_stream_destroy(s);
    return rc;
}

int transport_client_stream_send(transport_client_stream *s, const ProtobufCMessage *msg,
                                 aff_err *err)
{
    if (s->closed_send) return aff__fail(err, AFF_EINVAL, "the stream's sending side is closed");
    grpc_byte_buffer *bb = transport__pack(msg);
    if (!bb) return aff__fail(err, AFF_ENOMEM, "out of memory encoding a message");
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    bool ok = grpc_call_start_batch(s->call, &op, 1, &s->tag_send, NULL) == GRPC_CALL_OK &&
              pluck(s->cq, &s->tag_send);
    grpc_byte_buffer_destroy(bb);
    if (!ok)
        return aff__fail(err, AFF_EUNAVAILABLE,
                         "the call ended before the message was sent (see its status)");
    return 0;
}

int transport_client_stream_close_send(transport_client_stream *s, aff_err *err)
{
    if (s->closed_send) return 0;
    s->closed_send = true;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    if (grpc_call_start_batch(s->call, &op, 1, &s->tag_send, NULL) != GRPC_CALL_OK)
        return aff__fail(err, AFF_EINTERNAL, "cannot half-close the stream");
    pluck(s->cq, &s->tag_send);
    return 0;
}

/* Receives the next raw message into *bb (NULL at the end of the stream). */
static int stream_recv_raw(transport_client_stream *s, grpc_byte_buffer **bb, aff_err *err)
{
    grpc_op ops[2];
    size_t n = 0;
    *bb = NULL;
    memset(ops, 0, sizeof ops);
    if (!s->got_initial_md) {
        s->got_initial_md = true;
        ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->initial_md;
    }
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n++].data.recv_message.recv_message = bb;
    if (grpc_call_start_batch(s->call, ops, n, &s->tag_recv, NULL) != GRPC_CALL_OK)
        return aff__fail(err, AFF_EINTERNAL, "cannot receive on the stream");
    pluck(s->cq, &s->tag_recv);
    return 0;
}

int transport_client_stream_recv(transport_client_stream *s, const ProtobufCMessageDescriptor *desc,
                                 ProtobufCMessage **msg, aff_err *err)
{
    grpc_byte_buffer *bb = NULL;
    *msg = NULL;
    if (s->recv_ended) return 0;
    int rc = stream_recv_raw(s, &bb, err);
    if (rc) return rc;
    if (!bb) {
        s->recv_ended = true;
        return 0;
    }
    *msg = transport__unpack(bb, desc);
    grpc_byte_buffer_destroy(bb);
    if (!*msg) return aff__fail(err, AFF_EINTERNAL, "a streamed response could not be decoded");
    return 1;
}

int transport_client_stream_finish(transport_client_stream *s,
                                   const ProtobufCMessageDescriptor *resp_desc,
                                   ProtobufCMessage **resp, transport_call_status *status)
{
    int rc = 0;
    aff_err err;
    if (resp) *resp = NULL;
    if (s->finished) {
        local_status(status, GRPC_STATUS_INTERNAL, "the stream was already finished");
        return AFF_EINVAL;
    }
    transport_client_stream_close_send(s, &err);
    /* gRPC delivers the status only after the messages before it were read: drain them,
     * keeping the first as the response of a client-streaming call. */
    ProtobufCMessage *m = NULL;
    while (!s->recv_ended) {
        grpc_byte_buffer *bb = NULL;
        if (stream_recv_raw(s, &bb, &err) || !bb) {
            s->recv_ended = true;
            break;
        }
        if (resp_desc && resp && !m) m = transport__unpack(bb, resp_desc);
        grpc_byte_buffer_destroy(bb);
    }
    pluck(s->cq, &s->tag_status);
    s->finished = true;
    fill_status(status, s->status, s->details);
    rc = transport_client_status_to_aff((int)s->status);
    if (rc == 0 && resp_desc && resp) {
        if (!m) {
            local_status(status, GRPC_STATUS_INTERNAL, "the call ended without a response");
            rc = AFF_EINTERNAL;
        }
        *resp = m;
        m = NULL;
    }
    transport_client_free(m);
    return rc;
}

void transport_client_stream_destroy(transport_client_stream *s)
{
    if (!s) return;
    if (s->call) {
        if (!s->finished) {
            grpc_call_cancel(s->call, NULL);
            pluck(s->cq, &s->tag_status);
        }
        grpc_call_unref(s->call);
    }
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->initial_md);
    grpc_metadata_array_destroy(&s->trailing_md);
    cq_destroy(s->cq);
    free(s);
}

void transport_item_to_pb(const item_record *r, char **tag_ptrs, Affinity__V1__Item *out)
{
    affinity__v1__item__init(out);
    out->id = (char *)r->id;
    out->category = (char *)r->category;
    out->price = r->price;
    out->available = r->available;
    out->available_set = true;
    out->n_tags = r->n_tags;
    out->tags = tag_ptrs;
    for (uint32_t t = 0; t < r->n_tags; t++)
        tag_ptrs[t] = (char *)r->tags[t];
}

/* ---- replication: bootstrap from a peer's snapshot ------------------------------------- */

int transport_client_fetch_snapshot(transport_client *c, const char *path, uint64_t *seq,
                                    transport_call_status *status, aff_err *err)
{
    transport_client_stream *s = NULL;
    int rc = 0;
    *seq = 0;
    local_status(status, 0, "");
    FILE *f = fopen(path, "wb");
    if (!f) return aff__fail(err, AFF_EIO, "cannot create '%s': %s", path, strerror(errno));
    uint64_t got = 0, total = 0;
    bool first = true;
    Affinity__V1__GetSnapshotRequest req = AFFINITY__V1__GET_SNAPSHOT_REQUEST__INIT;
    if ((rc = transport_client_stream_open(c, "/affinity.v1.Affinity/GetSnapshot", 0, &s, err)) ||
        (rc = transport_client_stream_send(s, &req.base, err)) ||
        (rc = transport_client_stream_close_send(s, err)))
        goto finish;
    for (;;) {
        ProtobufCMessage *m = NULL;
        int n = transport_client_stream_recv(s, &affinity__v1__snapshot_chunk__descriptor, &m, err);
        if (n <= 0) {
            rc = n;
            break;
        }
        const Affinity__V1__SnapshotChunk *ch = (const void *)m;
        if (first) {
            *seq = ch->log_sequence;
            total = ch->total_bytes;
            first = false;
        }
        if (ch->data.len && fwrite(ch->data.data, 1, ch->data.len, f) != ch->data.len)
            rc = aff__fail(err, AFF_EIO, "writing '%s': %s", path, strerror(errno));
        got += ch->data.len;
        transport_client_free(m);
        if (rc) break;
    }
finish:
    if (s) {
        int frc = transport_client_stream_finish(s, NULL, NULL, status);
        if (!rc && frc)
            rc = aff__fail(err, frc, "GetSnapshot: %s", status ? status->message : "failed");
    }
    transport_client_stream_destroy(s);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0)
        if (!rc) rc = aff__fail(err, AFF_EIO, "writing '%s': %s", path, strerror(errno));
    fclose(f);
    if (!rc && (first || got != total))
        rc = aff__fail(err, AFF_EIO, "GetSnapshot: received %llu of %llu bytes",
                       (unsigned long long)got, (unsigned long long)total);
    if (rc) unlink(path);
    return rc;
}
