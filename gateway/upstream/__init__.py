"""Upstream providers: one pooled httpx client per named upstream (on the aiohttp transport,
gateway.upstream.transport), and the one boundary where their failures become GatewayErrors.

Like httpx's transports, this package is the only place that imports httpx: a transport error
while sending or while the answer streams comes out as UpstreamTimeout (504) or
UpstreamUnavailable (502) naming the upstream, with its `kind` for the metrics. An exception the
request body raised itself (the gateway's own 400, 408 or 413 found mid-upload, the client gone)
comes out of `send` as itself.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from gateway import __version__
from gateway.demo import PREFIX as DEMO_PREFIX
from gateway.demo import TOKEN as DEMO_TOKEN
from gateway.errors import (
    GatewayError,
    SettingsError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from gateway.settings import Settings, UpstreamSettings
from gateway.upstream.transport import AiohttpTransport

USER_AGENT = f"image-gateway/{__version__}"


class Answer:
    """An upstream's answer: status, headers, and the body as it streams."""

    __slots__ = ("_response", "headers", "status", "upstream")

    def __init__(self, response: httpx.Response, upstream: str) -> None:
        self._response = response
        self.upstream = upstream
        self.status = response.status_code
        self.headers = response.headers

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._response.headers.raw

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise _mapped(exc, self.upstream) from None

    async def aclose(self) -> None:
        await self._response.aclose()


@dataclass(slots=True)
class Upstream:
    name: str
    base_url: str
    api_key: str | None = field(repr=False)
    client: httpx.AsyncClient
    transport: AiohttpTransport

    async def send(self, path: str, body: AsyncIterable[bytes], content_type: str,
                   request_id: str, traceparent: str) -> Answer:
        """Send a request whose body streams from `body`; the headers every request shares
        live on the client."""
        headers = {"content-type": content_type, "x-request-id": request_id,
                   "traceparent": traceparent}
        request = self.client.build_request("POST", f"{self.base_url}{path}", headers=headers,
                                            content=body)
        try:
            return Answer(await self.client.send(request, stream=True), self.name)
        except httpx.TransportError as exc:
            raise _mapped(exc, self.name) from None


class Upstreams:
    """The named upstreams of the settings; "default" comes from GATEWAY_UPSTREAM_*."""

    def __init__(self, settings: Settings) -> None:
        self._by_name: dict[str, Upstream] = {}
        for name, (cfg, key) in resolve(settings).items():
            connect = cfg.connect_timeout or settings.upstream_connect_timeout
            read = cfg.read_timeout or settings.upstream_read_timeout
            write = cfg.write_timeout or settings.upstream_write_timeout
            # One connection per request in flight (HTTP/1.1): a pool smaller than the
            # instance's in-flight cap would queue admitted requests behind each other.
            size = cfg.max_connections or settings.upstream_max_connections or \
                settings.max_in_flight
            headers = {
                "accept": "application/json, text/event-stream",
                # Identity, so the answer's usage stays readable to the gateway (quotas, metrics).
                "accept-encoding": "identity",
                "user-agent": USER_AGENT,
            }
            if key:
                headers["authorization"] = f"Bearer {key}"
            transport = AiohttpTransport(httpx.Limits(
                max_connections=size, max_keepalive_connections=size,
                keepalive_expiry=settings.upstream_keepalive_seconds))
            client = http_client(
                transport, httpx.Timeout(connect=connect, read=read, write=write, pool=connect),
                headers)
            self._by_name[name] = Upstream(name, cfg.base_url, key, client, transport)

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    async def aclose(self) -> None:
        for upstream in self._by_name.values():
            await upstream.client.aclose()


def http_client(transport: AiohttpTransport, timeout: httpx.Timeout,
                headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """httpx on the aiohttp transport, keeping no cookies: a provider's Set-Cookie (a CDN's
    session cookie) would otherwise go with every later request, whichever client sent it."""
    return httpx.AsyncClient(
        headers=headers, timeout=timeout, transport=transport,
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        follow_redirects=False, trust_env=False)


def resolve(settings: Settings) -> dict[str, tuple[UpstreamSettings, str | None]]:
    """Every upstream with its key; SettingsError when a key's environment variable is unset.
    In demo mode every upstream is the built-in stand-in on the gateway's own port."""
    configs = {
        "default": UpstreamSettings(
            base_url=settings.upstream_base_url, api_key=settings.upstream_api_key),
        **settings.upstreams,
    }
    if settings.demo:
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        demo = UpstreamSettings(base_url=f"http://{host}:{settings.port}{DEMO_PREFIX}/v1")
        return {name: (demo, DEMO_TOKEN) for name in configs}
    return {name: (cfg, _api_key(name, cfg)) for name, cfg in configs.items()}


def _api_key(name: str, cfg: UpstreamSettings) -> str | None:
    if cfg.api_key is not None:
        return cfg.api_key.get_secret_value()
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise SettingsError(f"invalid setting upstreams.{name}.api_key_env: environment variable "
                            f"{cfg.api_key_env} is not set")
    return key


def _mapped(exc: httpx.TransportError, upstream: str) -> GatewayError:
    """A 504 for silence, a 502 for everything else that kept the upstream from answering."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream '{upstream}' did not answer in time.")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnreachable(
            f"The upstream '{upstream}' could not be reached (connect error).")
    return UpstreamUnavailable(f"The upstream '{upstream}' could not be reached (transport error).")
