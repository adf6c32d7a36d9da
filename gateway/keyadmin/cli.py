"""`gateway keys ...`: create, list, show, update and revoke the gateway's API keys.

With GATEWAY_REDIS_URL the command works on the same Redis as the servers, so a change is live at
once (within `key_cache_seconds`). Without it keys live in the config file's `[keys.ID]` tables:
`create` prints the lines to paste there, `list`/`show` read them, and changing or revoking a
key is an edit of that file.

The body models and key operations are shared with the admin HTTP API (gateway/keyadmin/ops.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import tomllib
from datetime import UTC, datetime
from typing import Any, NoReturn

from pydantic import ValidationError

from gateway.keyadmin.ops import (
    MAX_LIMIT,
    KeyChanges,
    KeyCreate,
    describe_error,
    find_key,
    new_record,
    revoke_key,
    update_key,
    usage_view,
)
from gateway.keys import LIMIT_MEANINGS, LIMIT_NAMES, LIMIT_UNITS, KeyRecord
from gateway.quota.base import QuotaStore

_BARE_TOML_KEY = re.compile(r"[A-Za-z0-9_-]+")


# ------------------------------------------------------------------------ config-file keys
def config_lines(record: KeyRecord) -> str:
    """The `[keys.ID]` table `KeyEntry` accepts: only the limits that are set. Checked by parsing
    it back, so what is printed is exactly what the gateway will load."""
    lines = [f"[keys.{record.id}]", f"hash = {_toml(record.hash)}", f"name = {_toml(record.name)}",
             f"created = {record.created}"]
    lines += [f"{name} = {value}" for name, value in record.limits.as_dict().items() if value]
    if record.models:
        lines.append(f"models = {_toml(list(record.models))}")
    if record.metadata:
        lines.append(f"metadata = {_toml(record.metadata)}")
    text = "\n".join(lines) + "\n"
    from gateway.settings import KeyEntry

    entry = KeyEntry.model_validate(tomllib.loads(text)["keys"][record.id])
    if (entry.hash, entry.name, entry.models, entry.metadata) != (
            record.hash, record.name, list(record.models), record.metadata):
        raise CliError("the key's metadata cannot be written as TOML exactly; simplify it")
    return text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are TOML's, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{k if _BARE_TOML_KEY.fullmatch(k) else _toml(k)} = {_toml(v)}"
                          for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise CliError("metadata cannot hold null in the config file (TOML has no null); "
                   "leave the field out instead")


# ------------------------------------------------------------------------------ the command
class CliError(Exception):
    """A mistake the operator can fix: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block."""
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0 to {MAX_LIMIT}; 0: no limit)")
    return value


def _models(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _metadata(text: str) -> dict[str, Any]:
    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"team\": \"a\"}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="TOML config file (GATEWAY_CONFIG)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    fields = _Parser(add_help=False)
    for name, meaning in LIMIT_MEANINGS.items():
        fields.add_argument(f"--{name.replace('_', '-')}", type=_limit, metavar="N",
                            help=f"{meaning} (0 or left out: no limit)")
    fields.add_argument("--models", type=_models, metavar="M1,M2",
                        help='models the key may use, comma-separated ("": every model)')
    fields.add_argument("--metadata", type=_metadata, metavar="JSON",
                        help="a JSON object kept with the key (replaces the previous one)")

    parser = _Parser(prog="gateway keys", description=(
        "Manage API keys: in Redis with GATEWAY_REDIS_URL, else in the config file's [keys.ID]."))
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="TOML config file (GATEWAY_CONFIG)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    parser_class=_Parser)
    create = actions.add_parser("create", parents=[common, fields],
                                help="create a key and print its secret (once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    actions.add_parser("list", parents=[common], help="list the keys")
    show = actions.add_parser("show", parents=[common], help="a key's limits and current usage")
    show.add_argument("id")
    update = actions.add_parser("update", parents=[common, fields],
                                help="change the given fields of a key (Redis only)")
    update.add_argument("id")
    update.add_argument("--name")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key (Redis only)")
    revoke.add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`gateway keys ARGS`: 0 on success; 2 with one line on stderr for any error."""
    try:
        args = build_parser().parse_args(argv)
        return asyncio.run(_run(args))
    except CliError as exc:
        return _fail(str(exc))
    except Exception as exc:  # never a traceback: settings, Redis and I/O errors are one line
        from gateway.errors import SettingsError
        from gateway.quota.base import StoreUnavailable

        if isinstance(exc, SettingsError):
            return _fail(str(exc))
        if isinstance(exc, StoreUnavailable | OSError) or type(exc).__module__.startswith("redis"):
            return _fail(f"the key store is unavailable: {exc}")
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}")


def _fail(message: str) -> int:
    print("gateway keys: " + " ".join(message.split()), file=sys.stderr)
    return 2


async def _run(args: argparse.Namespace) -> int:
    from gateway.quota import build_store
    from gateway.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    in_process = not settings.redis_url
    if in_process and args.action in ("update", "revoke"):
        edit = "edit" if args.action == "update" else "remove"
        raise CliError(f"without GATEWAY_REDIS_URL keys live in the config file: to {args.action} "
                       f"{args.id}, {edit} its [keys.{args.id}] table there and restart the "
                       "gateway")
    changes = _changes(args)
    if in_process and args.action == "create":
        assert isinstance(changes, KeyCreate)
        return _create_in_config(args, changes)
    try:
        store = build_store(settings)
    except ValueError as exc:  # a redis_url redis-py cannot parse
        raise CliError(f"invalid setting redis_url (GATEWAY_REDIS_URL): {exc}") from None
    try:
        return await _act(args, changes, store, in_process)
    finally:
        if store is not None:
            await store.aclose()


def _changes(args: argparse.Namespace) -> KeyChanges | None:
    if args.action not in ("create", "update"):
        return None
    given = {name: value for name in ("name", *LIMIT_NAMES, "models", "metadata")
             if (value := getattr(args, name, None)) is not None}
    if args.action == "update" and not given:
        options = ", ".join(f"--{n.replace('_', '-')}" for n in ("name", *LIMIT_NAMES))
        raise CliError(f"nothing to update: give {options}, --models or --metadata")
    try:
        return (KeyCreate if args.action == "create" else KeyChanges).model_validate(given)
    except ValidationError as exc:
        message, param, _ = describe_error(exc)
        raise CliError(f"--{param.split('[')[0].replace('_', '-')}: {message}" if param
                       else message) from None


async def _act(args: argparse.Namespace, changes: KeyChanges | None, store: QuotaStore | None,
               in_process: bool) -> int:
    note = ("keys from the config file (no GATEWAY_REDIS_URL); usage is counted inside each "
            "gateway process and is not visible from here")
    if args.action == "create":
        assert store is not None and isinstance(changes, KeyCreate)
        record, secret = new_record(changes)
        await store.put_key(record)
        _out(args, {**record.public(), "key": secret}, [
            f"Created {record.id} ({record.name}): {_limits_text(record)}; "
            f"{_models_text(record)}.", "Secret (shown once; only its hash is stored):", secret])
        return 0
    if args.action == "list":
        records = await store.list_keys() if store is not None else []
        if in_process:
            print(note, file=sys.stderr if args.json else sys.stdout)
        _out(args, {"object": "list", "data": [r.public() for r in records]}, _table(records))
        return 0
    record = await find_key(store, args.id) if store is not None else None
    if record is None:
        raise CliError(f"no key with id {args.id!r}" + (" in the config file" if in_process else ""))
    if args.action == "show":
        usage = None
        if not in_process and store is not None:
            usage = usage_view(await store.usage(record.id))
        if in_process:
            print(note, file=sys.stderr if args.json else sys.stdout)
        _out(args, {**record.public(), "usage": usage}, _details(record, usage))
        return 0
    assert store is not None
    if args.action == "update":
        assert changes is not None
        record = await update_key(store, record.id, changes) or record
        _out(args, record.public(), [f"Updated {record.id}.", *_details(record, None)])
        return 0
    was = record.status
    record = await revoke_key(store, record.id) or record
    _out(args, record.public(), [f"{'Already revoked' if was == 'revoked' else 'Revoked'} "
                                 f"{record.id} ({record.name})."])
    return 0


def _create_in_config(args: argparse.Namespace, spec: KeyCreate) -> int:
    record, secret = new_record(spec)
    lines = config_lines(record)
    _out(args, {**record.public(), "key": secret, "config": lines}, [
        "Secret (shown once; only its hash goes in the config):", secret, "",
        "No GATEWAY_REDIS_URL: keys live in the config file. Add these lines to it and restart "
        "the gateway:", "", lines.rstrip("\n")])
    return 0


def _out(args: argparse.Namespace, data: dict[str, Any], text: list[str]) -> None:
    print(json.dumps(data, ensure_ascii=False) if args.json else "\n".join(text))


def _limits_text(record: KeyRecord) -> str:
    parts = [f"{v} {LIMIT_UNITS[k]}" for k, v in record.limits.as_dict().items() if v]
    return ", ".join(parts) or "no limits"


def _models_text(record: KeyRecord) -> str:
    return "models " + ", ".join(record.models) if record.models else "every model"


def _when(created: int) -> str:
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M UTC") if created else "-"


def _table(records: list[KeyRecord]) -> list[str]:
    if not records:
        return ["no keys"]
    rows = [("ID", "NAME", "STATUS", "CREATED", "LIMITS", "MODELS")]
    rows += [(r.id, r.name, r.status, _when(r.created), _limits_text(r),
              ",".join(r.models) or "all") for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _details(record: KeyRecord, usage: dict[str, Any] | None) -> list[str]:
    lines = [f"id:       {record.id}", f"name:     {record.name}", f"status:   {record.status}",
             f"created:  {_when(record.created)}", f"limits:   {_limits_text(record)}",
             f"models:   {', '.join(record.models) or 'all'}",
             f"metadata: {json.dumps(record.metadata, ensure_ascii=False)}"]
    if usage is not None:
        lines.append(f"usage:    {usage['in_flight']} in flight")
        for name, w in usage["limits"].items():
            # requests: the last 60 s; "resets in" is when the next one of them leaves it
            limit = (f"limit {w['limit']}, {w['remaining']} remaining, resets in "
                     f"{_duration(w['reset_seconds'])}" if w["limit"] else "no limit")
            lines.append(f"  {name:<9} {w['used']} used, {limit}")
    return lines


def _duration(seconds: float) -> str:
    """Whole seconds rounded up, as retry-after: "resets in" is never sooner than the reset."""
    s = math.ceil(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub}"
    return f"{s}s"


if __name__ == "__main__":
    sys.exit(main())
