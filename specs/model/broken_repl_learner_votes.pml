/*
 * Broken on purpose: a member that lost its disk promises, and counts in an election's majority.
 * expect: acknowledged_survives
 */
#define BROKEN_LEARNER_VOTES
#include "replication.pml"
