/*
 * event_types.h: the built-in behaviour event types, defined once. Each entry is
 * X(NAME, value, "name", default weight); values match affinity.v1.EventType, so a proto
 * value casts directly to the profiles and metrics enums generated from this list. A custom
 * type (configured with --event-weights) is value AFF_EVENT_CUSTOM.
 */
#ifndef AFFINITY_EVENT_TYPES_H
#define AFFINITY_EVENT_TYPES_H

#define AFF_EVENT_TYPES(X)                                                                         \
    X(VIEW, 1, "view", 1.0f)                                                                       \
    X(CLICK, 2, "click", 2.0f)                                                                     \
    X(ADD_TO_CART, 3, "add_to_cart", 4.0f)                                                         \
    X(PURCHASE, 4, "purchase", 8.0f)

#define AFF_EVENT_BUILTIN_COUNT 4 /* the entries above, valued 1..4 */
#define AFF_EVENT_CUSTOM        5

/* Measurement-only types: accepted by PutEvents and counted by the outcomes module (attributed
 * to the recommendation that showed the item), never applied to profiles or models, so they
 * have no weight. X(NAME, value, "name"). */
#define AFF_EVENT_MEASUREMENT_TYPES(X) X(IMPRESSION, 6, "impression")

#define AFF_EVENT_IMPRESSION  6
#define AFF_EVENT_VALUE_LIMIT 7 /* every type value, built-in, custom or measurement, is below */

#endif
