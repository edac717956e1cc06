"""Conveyor's Python client: `Client` (async) and `SyncClient`, typed run
events (`conveyor_client.events`) and exceptions by gRPC status
(`conveyor_client.errors`). The generated stubs ship inside
(`conveyor_client._proto.v1`); nothing to generate."""

from conveyor_client import errors, events
from conveyor_client.client import Client, SyncClient, Tool, run_request
from conveyor_client.errors import (
    Cancelled,
    ConveyorError,
    DeadlineExceeded,
    InvalidRequest,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Cancelled",
    "Client",
    "ConveyorError",
    "DeadlineExceeded",
    "InvalidRequest",
    "SyncClient",
    "Tool",
    "Unauthenticated",
    "Unavailable",
    "errors",
    "events",
    "run_request",
]
