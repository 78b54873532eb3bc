/*
 * Broken on purpose: prepare and the one-phase commit skip the ORI version check (locks
 * are still taken), like a participant run with unsafe_disable_validation. A session can
 * then commit on a read that another commit has since overwritten: I-1 must fail.
 *
 * expect: no_stale_read_at_commit
 */
#define BROKEN_SKIP_VALIDATION
#include "oribus.pml"
