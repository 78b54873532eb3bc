/*
 * Broken on purpose: followers accept appends from a term below their promise, so a deposed primary still gets records onto a majority.
 * expect: acknowledged_survives
 */
#define BROKEN_NO_FENCE
#include "replication.pml"
