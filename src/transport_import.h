/*
 * transport_import.h: the ImportEvents handler (transport_import.c), for the method table in
 * transport_rpc.c. Only transport*.c include it.
 */
#ifndef AFFINITY_TRANSPORT_IMPORT_H
#define AFFINITY_TRANSPORT_IMPORT_H

#include "transport_internal.h"

#define TRANSPORT_IMPORT_MAX_REPORTED 1000 /* rejections listed in an ImportEventsResponse */
/* Replication: the most bytes of events in one ImportEvents log record (NATS's default
 * max_payload is 1 MiB; a valid event is at most about 10 KB). */
#define TRANSPORT_IMPORT_RECORD_BYTES (256u << 10)

/* Starts a client-streaming ImportEvents call (a tmethod_def `stream` handler). Each message
 * is decoded and applied on a blocking-work thread (profiles_import_events: one durable
 * transaction) before the next is read; the response is sent after the client's stream ends. */
void transport__import_events(tcall *c);
/* Replication: applies one ImportEvents log record (an ImportEventsRequest naming its
 * collection) on the apply thread, answering an ImportEventsResponse whose rejection indexes
 * count from the record's first event. */
void transport__apply_import_events(tcall *c, ProtobufCMessage *msg);

#endif
