/*
 * Broken on purpose: a primary answers reads without its primary lease, after another took over.
 * expect: reads_are_current
 */
#define BROKEN_NO_LEASE
#include "replication.pml"
