/*
 * Broken on purpose: a shard that restarts takes new write intents at once. It lost the
 * read leases it had granted with its memory, so a commit that validated a read there and
 * has not reached its commit point yet is no longer protected: another commit writes the
 * key, and the first commits on its stale read. I-1 (through I-8) must fail: in the default
 * configuration through B's one-phase commit on its writer, in RO_2PC through the primary's
 * decision of A's two-phase commit.
 *
 * expect: no_stale_read_at_commit
 * configs: default ro_2pc
 */
#define BROKEN_NO_RESTART_GRACE
#include "oribus.pml"
