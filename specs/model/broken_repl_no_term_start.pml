/*
 * Broken on purpose: a new primary serves at once, without waiting for a record of its own term to be committed.
 * expect: acknowledged_survives
 */
#define BROKEN_NO_TERM_START
#include "replication.pml"
