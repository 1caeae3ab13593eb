"""Domain errors of the request pipeline and their gRPC / HTTP mapping (one table)."""

from __future__ import annotations

import enum

import grpc

from switchyard.v1 import generate_pb2


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400, generate_pb2.ERROR_CODE_INVALID_ARGUMENT)
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404, generate_pb2.ERROR_CODE_NOT_FOUND)
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401, generate_pb2.ERROR_CODE_UNSPECIFIED)
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, generate_pb2.ERROR_CODE_RESOURCE_EXHAUSTED)
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503, generate_pb2.ERROR_CODE_UNAVAILABLE)
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504, generate_pb2.ERROR_CODE_DEADLINE_EXCEEDED)
    CANCELLED = (grpc.StatusCode.CANCELLED, 499, generate_pb2.ERROR_CODE_CANCELLED)
    INTERNAL = (grpc.StatusCode.INTERNAL, 500, generate_pb2.ERROR_CODE_INTERNAL)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]

    @classmethod
    def from_stream_code(cls, code: int) -> "ErrorKind":
        for kind in cls:
            if kind.value[2] == code and code != generate_pb2.ERROR_CODE_UNSPECIFIED:
                return kind
        return cls.INTERNAL


class RequestError(Exception):
    """A request cannot be served; `message` says what to fix."""

    def __init__(self, kind: ErrorKind, message: str, *, field: str | None = None,
                 retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


def invalid(field: str, message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, f"{field}: {message}", field=field)
