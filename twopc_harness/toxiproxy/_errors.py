"""The API's error type and the exact messages the real server uses."""

from __future__ import annotations

PROXY_NOT_FOUND = "proxy not found"
TOXIC_NOT_FOUND = "toxic not found"
PROXY_EXISTS = "proxy already exists"
TOXIC_EXISTS = "toxic already exists"
INVALID_STREAM = "stream was invalid, can be either upstream or downstream"
INVALID_TOXIC_TYPE = "invalid toxic type"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_body(detail: str) -> ApiError:
    return ApiError(400, f"bad request body: {detail}")


def missing_field(detail: str) -> ApiError:
    return ApiError(400, f"missing required field: {detail}")
