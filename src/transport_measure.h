/*
 * transport_measure.h: the measurement RPCs (GetStats and the experiment calls). Only the
 * transport includes it.
 */
#ifndef AFFINITY_TRANSPORT_MEASURE_H
#define AFFINITY_TRANSPORT_MEASURE_H

#include "transport_internal.h"

void transport__rpc_get_stats(tcall *c, ProtobufCMessage *msg);
void transport__rpc_create_experiment(tcall *c, ProtobufCMessage *msg);
void transport__rpc_get_experiment(tcall *c, ProtobufCMessage *msg);
void transport__rpc_list_experiments(tcall *c, ProtobufCMessage *msg);
void transport__rpc_stop_experiment(tcall *c, ProtobufCMessage *msg);

#endif
