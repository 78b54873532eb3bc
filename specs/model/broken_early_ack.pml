/*
 * Broken on purpose: the primary makes its COMMITTED decision visible and answers before
 * the record is fsynced. A crash can then lose an acknowledged commit: I-3 must fail.
 *
 * expect: acknowledged_is_durable
 */
#define BROKEN_EARLY_ACK
#include "oribus.pml"
