"""The bus's HTTP gateway: S-Bus compatible routes, the native /v1 API, metrics, dashboard."""

from oribus.gateway.app import DEFAULT_HTTP, GatewayConfig, HttpGateway

__all__ = ["DEFAULT_HTTP", "GatewayConfig", "HttpGateway"]
