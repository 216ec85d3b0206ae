"""One error type for everything a client can get wrong, rendered as ``{"error": {code, message, type, param}}``.

``type`` and ``param`` are OpenAI's (its clients read them): ``type`` follows from the status, ``param``
names the offending request field when there is one.
"""

from __future__ import annotations


class ApiError(Exception):
    """A client-facing failure with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None):
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param

    @property
    def type(self) -> str:
        """OpenAI's error type for the status."""
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 429:
            return "rate_limit_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "type": self.type, "param": self.param}}

    def __reduce__(self):  # keep the fields when Ray pickles the exception across processes
        return (type(self), (self.status, self.code, self.message, self.headers, self.param))


def _printable(text: str | None) -> str | None:
    """``text`` encodable as UTF-8 (a lone surrogate from the request, escaped), so the error can be sent."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")
