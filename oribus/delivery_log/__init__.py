"""Per-session read tracking of one shard (specs/engine.md, "The commit rule (ORI)").

``DeliveryLog`` records which version of which key each session was given,
rebuilds a session's read set for a commit (session or transaction scope),
advances it on the session's own commits, and fails closed with
SessionExpired when part of a read set may have been lost. See
``oribus/delivery_log/log.py`` for the entry layout and the limits.
"""

from oribus.delivery_log.config import DeliveryLogConfig
from oribus.delivery_log.log import MAX_SEQ, SEQ_BITS, DeliveryLog

__all__ = ["MAX_SEQ", "SEQ_BITS", "DeliveryLog", "DeliveryLogConfig"]
