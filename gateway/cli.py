"""The `gateway` command."""

from __future__ import annotations

import argparse
import os
import sys

from gateway.errors import SettingsError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        # `keys` parses its own arguments, so its errors are one line too (see gateway.keyadmin.cli).
        from gateway.keyadmin.cli import main as keys_main

        return keys_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible image gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("keys", add_help=False,
                        help="create, list, show, update and revoke API keys (gateway keys -h)")
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (GATEWAY_WORKERS, default 1)")
    serve.add_argument("--config", help="TOML config file (GATEWAY_CONFIG)")
    serve.add_argument("--demo", action="store_true", default=None,
                       help="answer from a built-in stand-in provider: try everything without a "
                            "provider key (GATEWAY_DEMO)")
    args = parser.parse_args(argv)
    try:
        return _serve(args)
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from gateway import server, upstream
    from gateway.catalog import Catalog
    from gateway.settings import load_settings

    if args.config:
        # Workers are separate processes that load settings themselves, from the environment.
        os.environ["GATEWAY_CONFIG"] = args.config
    overrides = {k: v for k in ("host", "port", "workers", "demo")
                 if (v := getattr(args, k)) is not None}
    for key, value in overrides.items():
        os.environ[f"GATEWAY_{key.upper()}"] = str(value)
    settings = load_settings()
    Catalog.from_settings(settings)  # every setting mistake surfaces here, as one line
    upstream.resolve(settings)
    if settings.workers > 1 and not settings.redis_url and (settings.keys or settings.admin_key):
        raise SettingsError(
            "invalid setting workers (GATEWAY_WORKERS): the in-process key store ([keys] or an "
            "admin key without GATEWAY_REDIS_URL) serves one process; use --workers 1 or set "
            "GATEWAY_REDIS_URL")
    server.serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
