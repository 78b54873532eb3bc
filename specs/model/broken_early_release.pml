/*
 * Broken on purpose: the coordinator releases the read leases as soon as the validations
 * (and, with several writers, phase one) are done, before the commit point, instead of once
 * the outcome is known. Another commit then writes a key a lease covered, and the commit
 * that relied on it reaches its commit point on the stale read. I-1 (through I-8) must
 * fail: in the default configuration through B's one-phase commit on its writer, in RO_2PC
 * through the primary's decision of A's two-phase commit.
 *
 * expect: no_stale_read_at_commit
 * configs: default ro_2pc
 */
#define BROKEN_EARLY_RELEASE
#include "oribus.pml"
