/*
 * Broken on purpose: a primary answers a transaction's status from a record of its log that is not yet on a majority; a failover to a member without it changes the outcome it answered.
 * expect: acknowledged_survives
 */
#define BROKEN_STATUS_BEFORE_MAJORITY
#include "replication.pml"
