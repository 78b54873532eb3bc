/*
 * Broken on purpose: YES votes carry no versions, so the coordinator learns a
 * participant's new versions only from its finish reply. When that reply is lost (the
 * participant is down), the client is told "committed" with the primary's versions only:
 * I-7 must fail.
 *
 * expect: acknowledged_names_its_versions
 */
#define BROKEN_PARTIAL_ACK
#include "oribus.pml"
