/*
 * Broken on purpose: reads do not wait for write intents. A reader can see a key of a
 * transaction whose commit point passed before the participant holding that key applied
 * it, i.e. half of a commit: I-2 must fail.
 *
 * expect: all_or_nothing_visibility
 */
#define BROKEN_READ_THROUGH
#include "oribus.pml"
