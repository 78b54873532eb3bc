/*
 * Broken on purpose: a primary acknowledges a record it alone holds; losing that member (its disk) loses an acknowledged commit.
 * expect: acknowledged_survives
 */
#define BROKEN_ACK_BEFORE_MAJORITY
#include "replication.pml"
