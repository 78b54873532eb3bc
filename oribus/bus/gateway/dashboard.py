"""The operator dashboard (``GET /``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from oribus.bus.gateway.app import HttpGateway


class DashboardRoutes:
    def __init__(self, gateway: HttpGateway) -> None:
        self.gw = gateway

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.page)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>oribus</title>", content_type="text/html")

    async def close(self) -> None:
        pass
