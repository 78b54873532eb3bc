/*
 * Broken on purpose: a candidate with a majority of promises takes over without the highest last position among them.
 * expect: acknowledged_survives
 */
#define BROKEN_ELECT_ANY
#include "replication.pml"
