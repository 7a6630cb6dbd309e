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

#endif
