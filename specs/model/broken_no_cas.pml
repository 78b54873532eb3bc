/*
 * Broken on purpose: the primary writes the coordinator's COMMITTED without comparing,
 * overwriting an ABORTED the recovery sweep recorded for a transaction it thought
 * abandoned. A late commit then follows an abort: I-4 must fail.
 *
 * expect: not_both_committed_and_aborted
 */
#define BROKEN_NO_CAS
#include "oribus.pml"
