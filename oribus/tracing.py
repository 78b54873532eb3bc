"""Traces of reads and commits across the SDK, the bus and the shards (OpenTelemetry).

Off unless turned on, and then nearly free: every instrumented place asks ``span(...)``,
which returns one shared do-nothing context manager (yielding None) while tracing is off.
On with ``enable()`` (an application using the SDK; its own tracer provider, or the
global one), or in a server process with ``--otel`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``
set (``enable_from_environment``: OTLP over HTTP to that endpoint). It needs the ``otel``
extra (``pip install 'oribus[otel]'``); without it, turning tracing on says so.

Spans (``specs/wire.md``, "Trace context"):

    oribus.<op>            the SDK's call (kind CLIENT): read, commit, history, ...
    oribus.bus.<op>        the bus serving it (SERVER): read, commit, history, ...
    oribus.shard.<op>      a shard serving the bus (SERVER): read, validate, prepare,
                           commit_one_phase, decide, finish, ...

with the attributes ``oribus.agent``, ``oribus.session``, ``oribus.commit_id``,
``oribus.keys``, ``oribus.shard``, ``oribus.shards``, ``oribus.commit.path`` (``1pc``,
``one-writer``, ``2pc``, ``read-only``) and, on a refusal, ``oribus.refused`` (the error
code) and ``oribus.conflict.keys``. The context crosses a process boundary inside the
call itself (``TRACE``: the W3C ``traceparent`` and ``tracestate`` of the caller's span, in
the call's arguments): the SDK's calls and the bus's calls to its shards share one
connection, so a per-connection header could not name each call's parent. The HTTP
gateway takes the ``traceparent`` header of each request.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])

log = logging.getLogger("oribus.tracing")

TRACE = "@trace"  # the key of a call's arguments that carries its caller's trace context
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_propagator: Any = None


class _Off:
    """What ``span`` returns while tracing is off: enters to None, costs nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_OFF = _Off()


def on() -> bool:
    return _tracer is not None


def _import_error() -> ImportError:
    return ImportError("tracing needs OpenTelemetry: pip install 'oribus[otel]' "
                       "(opentelemetry-api, opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)")


def enable(tracer_provider: Any = None) -> None:
    """Turn spans on in this process, from ``tracer_provider`` (default: the global one,
    which the application configures). Idempotent; ``disable()`` turns them off."""
    global _tracer, _propagator
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise _import_error() from None
    provider = tracer_provider or trace.get_tracer_provider()
    _tracer = provider.get_tracer("oribus")
    _propagator = TraceContextTextMapPropagator()


def disable() -> None:
    global _tracer, _propagator
    _tracer = _propagator = None


def enable_from_environment(service: str, *, force: bool = False) -> bool:
    """A server process: when ``force`` (``--otel``) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set,
    export spans over OTLP/HTTP (to that endpoint, default ``http://localhost:4318``) as
    ``service``; True if tracing is now on."""
    if not force and not os.environ.get(ENDPOINT_ENV):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise _import_error() from None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    enable(provider)
    _providers.append(provider)
    log.info("tracing on: %s exports spans over OTLP/HTTP to %s", service,
             os.environ.get(ENDPOINT_ENV, "http://localhost:4318"))
    return True


_providers: list[Any] = []  # what enable_from_environment made: flushed by shutdown()


def shutdown() -> None:
    """Export what is buffered and stop (a server process, on its way out)."""
    while _providers:
        _providers.pop().shutdown()
    disable()


def span(name: str, *, client: bool = False, attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: the span ``name`` (kind SERVER or, with ``client``, CLIENT) as the
    current one, entering to the span; or, while tracing is off, to None. An exception
    leaving it is recorded and marks the span as an error."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind

    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT if client else SpanKind.SERVER,
                                        attributes=dict(attributes) if attributes else None)


def annotate(**attributes: Any) -> None:
    """Set attributes (``commit_path="2pc"`` → ``oribus.commit.path``) on the current span,
    if tracing is on."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, value in attributes.items():
        current.set_attribute("oribus." + key.replace("_", "."), value)


def refused(current: Any, error: BaseException) -> None:
    """Mark ``current`` (a span, or None while off) with the refusal ``error``: its code, and
    the keys of a conflict."""
    if current is None:
        return
    current.set_attribute("oribus.refused", getattr(error, "code", type(error).__name__))
    stale = getattr(error, "stale", None)
    if stale:
        current.set_attribute("oribus.conflict.keys", [s.key for s in stale])


def inject(args: Any) -> Any:
    """``args`` of an outgoing call, with the current trace context under ``TRACE`` (a dict
    of arguments only; unchanged while tracing is off)."""
    if _tracer is None or not isinstance(args, dict):
        return args
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if carrier:
        args[TRACE] = carrier
    return args


def carrier_of(args: Any) -> Mapping[str, str] | None:
    """The trace context an incoming call carries, if any (and tracing is on)."""
    if _tracer is None or not isinstance(args, dict):
        return None
    carrier = args.get(TRACE)
    return carrier if isinstance(carrier, dict) else None


@contextlib.contextmanager
def remote_parent(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Within it, spans are children of the span that ``carrier`` (``traceparent`` /
    ``tracestate``, from a call or HTTP headers) names; nothing happens without one."""
    if _tracer is None or not carrier:
        yield
        return
    from opentelemetry import context

    token = context.attach(_propagator.extract({k: v for k, v in carrier.items() if isinstance(v, str)}))
    try:
        yield
    finally:
        context.detach(token)


def traced_shard_call(name: str) -> Callable[[F], F]:
    """Decorate a shard's method: its calls become ``oribus.shard.<name>`` spans, with the
    shard and the commit id (a ``ShardTxn``'s, or a ``txn_id`` argument). While tracing is
    off, a call returns the method's own coroutine: one plain call more, no frame more."""

    def wrap(method: F) -> F:
        span_name = "oribus.shard." + name

        async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else None
            commit_id = first if isinstance(first, str) else getattr(first, "txn_id", None)
            attributes: dict[str, Any] = {"oribus.shard": self.shard_id}
            if commit_id is not None:
                attributes["oribus.commit_id"] = commit_id
            with span(span_name, attributes=attributes) as current:
                try:
                    return await method(self, *args, **kwargs)
                except Exception as e:
                    refused(current, e)
                    raise

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
            if _tracer is None:
                return method(self, *args, **kwargs)
            return traced(self, *args, **kwargs)

        return cast(F, call)

    return wrap
