"""One error type for everything a client can get wrong, rendered as ``{"error": {code, message}}``."""

from __future__ import annotations


class ApiError(Exception):
    """A client-facing failure with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def __reduce__(self):  # keep the fields when Ray pickles the exception across processes
        return (type(self), (self.status, self.code, self.message, self.headers))
