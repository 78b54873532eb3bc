/*
 * Broken on purpose: participants ignore the epoch in the session's token. A shard that
 * restarted has lost its delivery log, validates the session's commit against nothing
 * and lets a stale read through: I-1 must fail.
 *
 * expect: no_stale_read_at_commit
 */
#define BROKEN_NO_EPOCH
#include "oribus.pml"
