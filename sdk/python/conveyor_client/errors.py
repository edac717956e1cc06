"""gRPC statuses as exceptions a caller can catch by meaning."""

from __future__ import annotations

import grpc


class ConveyorError(Exception):
    """A call to Conveyor failed; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidRequest(ConveyorError):
    """The request was refused (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)."""


class Unavailable(ConveyorError):
    """The scheduler (or a service behind it) cannot be reached."""


class DeadlineExceeded(ConveyorError):
    """The call's deadline passed."""


class Cancelled(ConveyorError):
    """The call was cancelled."""


class Unauthenticated(ConveyorError):
    """The token was missing or refused."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}


def from_rpc_error(e: grpc.RpcError) -> ConveyorError:
    code, details = e.code(), e.details() or ""
    return _BY_CODE.get(code, ConveyorError)(code, details)
