"""Client channels: round-robin over every address a `dns:///` name resolves
to, keepalive, and request-id propagation."""

from __future__ import annotations

import asyncio
import json

import grpc
import structlog

from conveyor_common import tracing
from conveyor_common.interceptors import REQUEST_ID_KEY
from conveyor_common.security import ClientSecurity

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

CHANNEL_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def channel(target: str, security: ClientSecurity | None = None) -> grpc.aio.Channel:
    """A channel to `target` (`host:port` or `dns:///host:port`): TLS when
    `security` has it, else plaintext. Tokens go per call (security.metadata())."""
    return (security or ClientSecurity()).channel(target, CHANNEL_OPTIONS)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Forwards the current request id and span downstream."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    ids = ((REQUEST_ID_KEY, request_id),) if request_id else ()
    return ids + tracing.inject()


class Unreachable(Exception):
    """No connection to a service within the connect timeout."""


async def wait_connected(channel: grpc.aio.Channel, name: str, target: str, timeout: float):
    """Returns once `channel` has a ready connection (at once when it has
    one); raises Unreachable after `timeout` seconds, so a call to a service
    that is down fails fast instead of waiting out its whole deadline."""
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except TimeoutError:
        raise Unreachable(
            f"{name} UNAVAILABLE: no connection to {target} within {timeout:g} s"
        ) from None
