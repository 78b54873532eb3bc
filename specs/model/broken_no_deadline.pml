/*
 * Broken on purpose: the commit point ignores the deadline of the read leases. A lease
 * that ran out no longer keeps writers away, so another commit writes the key it covered,
 * and the commit that relied on it still reaches its commit point on the stale read. I-1
 * (through I-8) must fail: in the default configuration through B's one-phase commit on
 * its writer, in RO_2PC through the primary's decision of A's two-phase commit.
 *
 * expect: no_stale_read_at_commit
 * configs: default ro_2pc
 */
#define BROKEN_NO_DEADLINE
#include "oribus.pml"
