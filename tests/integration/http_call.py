"""One HTTP call to a gateway under test: (status, JSON body or text)."""

from __future__ import annotations

import json


async def call(http, method, path, **kw):
    async with http.request(method, path, **kw) as r:
        body = await r.read()
        return r.status, (json.loads(body) if body[:1] in (b"{", b"[") else body.decode())
