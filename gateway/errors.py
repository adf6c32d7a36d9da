"""Every error a client can meet, in OpenAI's wire shape, and the one start-up error.

Like httpx's exceptions module, this is the single place that owns the error taxonomy:
the route raises these, and only `GatewayError.body()` knows the JSON shape.
"""

from __future__ import annotations

import json


class SettingsError(Exception):
    """A configuration mistake; the CLI prints str(exc) as one line and exits."""


class GatewayError(Exception):
    """An error answered to the client as `{"error": {...}}` in OpenAI's format."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": err}).encode()


class InvalidRequest(GatewayError):
    """A bad value, a malformed body or a field the model does not take (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class RequestTooLarge(GatewayError):
    """The body exceeds the configured maximum (413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    """The request line and headers exceed max_header_bytes (431, before any route)."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UpstreamUnavailable(GatewayError):
    """The upstream could not be reached or broke the connection (502, retryable)."""

    status = 502
    code = "upstream_unavailable"


class UpstreamResponseTooLarge(UpstreamUnavailable):
    """The upstream's answer outgrew max_response_bytes (or one SSE event max_event_bytes): a
    runaway upstream must not stream forever or fill the gateway's memory (502)."""

    code = "upstream_response_too_large"


class UpstreamTimeout(GatewayError):
    """The upstream stayed silent longer than the read timeout (504, retryable)."""

    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class RequestTimeout(GatewayError):
    """The client went silent in the middle of its body (408; the SDKs retry it)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Unauthorized(GatewayError):
    """A missing, unknown or revoked API key (401)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    """The key may not do this: a model outside its list, or the admin API (403)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class RateLimited(GatewayError):
    """Requests per minute or concurrency exceeded: retry after the given time (429)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    """The day's images or the month's tokens are spent: retrying now cannot help (429)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
