"""Log output for the servers: plain text, or one JSON object per line (``--log-json``).

JSON lines carry ``ts`` (unix seconds), ``level``, ``logger`` and ``msg``; a
message that is itself a JSON object (the HTTP gateway's request lines, with
method, path, status, ms, agent and commit id) is merged in rather than
quoted, so log pipelines can filter on ``commit_id`` directly.
"""

from __future__ import annotations

import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name}
        if msg.startswith("{"):
            try:
                fields = json.loads(msg)
            except ValueError:
                fields = None
            if isinstance(fields, dict):
                out.update(fields)
            else:
                out["msg"] = msg
        else:
            out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(verbose: bool, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
