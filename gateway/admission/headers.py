"""OpenAI's x-ratelimit-* headers and duration format, from a key's windows."""

from __future__ import annotations

from gateway.quota.base import Window


def rate_limit_headers(windows: dict[str, Window]) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,images,tokens} for the limits the key has."""
    headers = {}
    for name, w in windows.items():
        if not w.limit:
            continue
        headers[f"x-ratelimit-limit-{name}"] = str(w.limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(w.remaining)
        headers[f"x-ratelimit-reset-{name}"] = duration(w.reset_ms)
    return headers


def duration(ms: int) -> str:
    """OpenAI's duration format: 20ms, 1s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    hours, rest = divmod(int(seconds), 3600)
    minutes = rest // 60
    secs = seconds - hours * 3600 - minutes * 60
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text
