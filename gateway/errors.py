"""Every error a client can meet, in OpenAI's wire shape, and the one start-up error.

Like httpx's exceptions module, this is the single place that owns the error taxonomy:
the route raises these, and only `GatewayError.body()` knows the JSON shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any


class SettingsError(Exception):
    """A configuration mistake; the CLI prints str(exc) as one line and exits."""


class GatewayError(Exception):
    """An error answered to the client as `{"error": {...}}` in OpenAI's format."""

    status = 500
    type = "server_error"
    code: str | None = None
    # How the upstream failed, for gateway_upstream_errors_total ("" for the gateway's own).
    kind = ""

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
    """The upstream broke the connection, answered beyond bounds, or refused the gateway's own
    key: no answer the client can use (502, retryable)."""

    status = 502
    code = "upstream_unavailable"
    kind = "reset"


class UpstreamUnreachable(UpstreamUnavailable):
    """The upstream could not be connected to (502, retryable)."""

    kind = "connect"


class UpstreamRejectedKey(UpstreamUnavailable):
    """The upstream refused the gateway's own key: the operator's problem, never the client's."""

    kind = "status"


class UpstreamResponseTooLarge(UpstreamUnavailable):
    """The upstream's answer outgrew max_response_bytes (or one SSE event max_event_bytes): a
    runaway upstream must not stream forever or fill the gateway's memory (502)."""

    code = "upstream_response_too_large"
    kind = "too_large"


class UpstreamTimeout(GatewayError):
    """The upstream stayed silent longer than the read timeout (504, retryable)."""

    status = 504
    code = "upstream_timeout"
    kind = "timeout"


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


# What an upstream's error may carry that identifies the operator's account: API keys (OpenAI
# echoes part of a wrong one), organisation and project ids.
# Not after a lower-case letter ("task-1234" stays), but after anything else ("key_sk-...",
# "%3Dsk-...").
_IDENTIFIERS = re.compile(r"(?<![a-z])(sk-|org-|proj_)[A-Za-z0-9_\-*.]{4,}")
_UPSTREAM_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")


def scrub(text: str) -> str:
    return _IDENTIFIERS.sub(lambda m: m[1] + "***", text)


class UpstreamError(GatewayError):
    """The upstream's own error answer, passed on with its status, type, param and code, its
    retry headers, and nothing that identifies the operator's account."""

    def __init__(self, status: int, body: bytes, *, is_json: bool,
                 headers: Mapping[str, str]) -> None:
        error: Any = None
        if is_json:
            try:
                error = json.loads(body).get("error")
            except (ValueError, UnicodeDecodeError, AttributeError):
                error = None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
        else:  # a proxy's HTML page, a plain "Internal Server Error", a cut or odd body
            text = body[:300].decode(errors="replace").strip()
            message, error = f"The upstream answered {status}: {text}", {"code": "upstream_error"}
        super().__init__(scrub(message), param=_text(error.get("param")),
                         headers={k: headers[k] for k in _UPSTREAM_HEADERS if k in headers})
        self.code = _text(error.get("code"))
        if "x-request-id" in headers:
            self.headers["x-upstream-request-id"] = headers["x-request-id"]
        self.status = status
        self.type = _text(error.get("type")) or ("server_error" if status >= 500
                                                 else "invalid_request_error")


def _text(value: object) -> str | None:
    return scrub(str(value)) if value is not None else None
