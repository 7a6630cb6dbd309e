/*
 * transport_privacy.h: the privacy handlers (ExportUser). Only transport*.c include this.
 */
#ifndef AFFINITY_TRANSPORT_PRIVACY_H
#define AFFINITY_TRANSPORT_PRIVACY_H

#include "transport_internal.h"

/* ExportUser: everything held about a shopper in one collection or all (blocking: it reads
 * the store). */
void transport__rpc_export_user(tcall *c, ProtobufCMessage *msg);
/* SetUserOptOut: a shopper's personalization opt-out (blocking: a durable write). */
void transport__rpc_set_user_opt_out(tcall *c, ProtobufCMessage *msg);

#endif
