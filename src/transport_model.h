/*
 * transport_model.h: the learning RPCs (Train, GetModel, GetSegment) and the model's part of
 * CollectionInfo (its spaces and model state). Only the transport includes it.
 */
#ifndef AFFINITY_TRANSPORT_MODEL_H
#define AFFINITY_TRANSPORT_MODEL_H

#include "model.h"
#include "transport_internal.h"

void transport__rpc_train(tcall *c, ProtobufCMessage *msg);
void transport__rpc_get_model(tcall *c, ProtobufCMessage *msg);
void transport__rpc_get_segment(tcall *c, ProtobufCMessage *msg);

/* Replication: apply a ModelPart record (the part kept in the store) and a ModelCommit record
 * (the parts put together, checked and installed as version = the commit's sequence). */
void transport__apply_model_part(tcall *c, ProtobufCMessage *msg);
void transport__apply_model_commit(tcall *c, ProtobufCMessage *msg);

/* Storage for one ModelInfo and the messages it points to. */
typedef struct tmodel_pb {
    model_info mi;
    Affinity__V1__ModelInfo info;
    Affinity__V1__ModelParams params, next;
    Affinity__V1__FloatValue floats[6];
    Affinity__V1__UInt32Value cg[2];
    Affinity__V1__TrainingJob job;
    char *spaces[2];
} tmodel_pb;

/* Sets info->spaces and info->model for the collection (pointing into st, which must outlive
 * the packing). Without a model module the collection shows only its content space. */
void transport__collection_model(transport *t, const char *collection,
                                 Affinity__V1__CollectionInfo *info, tmodel_pb *st);

/* Applies the set fields of pb over base (validated together: AFF_EINVAL names the field as
 * "<prefix>.<field>"). pb NULL: *out = *base. */
int transport__model_params(const Affinity__V1__ModelParams *pb, const als_params *base,
                            const char *prefix, als_params *out, aff_err *err);

#endif
