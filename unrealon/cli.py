"""
The C{unrealon} command: publish events and call backend methods through a
node's HTTP API (PROTOCOL.md section 8), and mint development tokens.

    unrealon publish ROOM EVENT [--data JSON] [KEY=VALUE ...]
    unrealon call METHOD [--data JSON] [KEY=VALUE | KEY:=JSON ...]
    unrealon methods
    unrealon token [USER] [--ttl SECONDS] [--rooms PATTERN ...] [--info JSON] [--methods PATTERN ...]
    unrealon --version

The client side is the standard library only (argparse, urllib.request,
json): nothing here imports Twisted, so the command starts at once.  Only
C{--help} looks at the server's own method registry, to list the backend
methods.  A refused or failed request prints one line on stderr and exits 1;
a usage error exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, NoReturn
from urllib.parse import quote

from unrealon import __version__

DEFAULT_URL = "http://127.0.0.1:8766"
#: one request's time limit (s); the server answers within 5 s
DEFAULT_TIMEOUT = 10.0


class CommandError(Exception):
    """Why a command failed, in one line."""


# -- params from the command line ------------------------------------------------------


def json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"{what} is not JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, dict):
        raise CommandError(f"{what} must be a JSON object, e.g. '{{\"text\": \"hi\"}}'")
    return value


def parse_fields(items: list[str]) -> dict[str, Any]:
    """C{KEY=VALUE} (a string) and C{KEY:=JSON} (any JSON value), as HTTPie has them."""
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.rstrip(":"):
            raise CommandError(f"{item!r} is not KEY=VALUE (a string) or KEY:=JSON")
        if key.endswith(":"):
            key = key[:-1]
            try:
                fields[key] = json.loads(value)
            except ValueError:
                raise CommandError(f"{item!r}: the value after := is not JSON") from None
        else:
            fields[key] = value
    return fields


# -- the HTTP API ------------------------------------------------------------------------


def api_key_from(given: str | None) -> str:
    """C{--api-key}, else the first key of C{UNREALON_API_KEY} (the server's own variable)."""
    raw = given if given is not None else os.environ.get("UNREALON_API_KEY", "")
    key = next((k.strip() for k in raw.split(",") if k.strip()), "")
    if not key:
        raise CommandError(
            "no API key: pass --api-key or set UNREALON_API_KEY to a key the server "
            "was started with (make dev prints its development key)"
        )
    return key


def call_api(
    url: str,
    method: str,
    params: dict[str, Any],
    api_key: str,
    *,
    idempotency_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """POST the params to /api/<method>; the result, or L{CommandError}."""
    headers = {"Content-Type": "application/json", "Authorization": f"apikey {api_key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/{quote(method, safe='')}",
        data=json.dumps(params).encode("utf-8"),
        headers=headers,
        method="POST",
    )
    status, body = _send(request, url, timeout)
    reply = _json_reply(body)
    if status == 200 and isinstance(reply, dict) and "result" in reply:
        return reply["result"]
    raise CommandError(describe_error(status, reply, body))


def _send(request: urllib.request.Request, url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError as e:
        raise CommandError(
            f"cannot reach {url}: {e.reason} (is the server running? make dev starts one)"
        ) from None
    except (TimeoutError, OSError) as e:
        raise CommandError(f"cannot reach {url}: {e}") from None


def _json_reply(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def describe_error(status: int, reply: Any, body: bytes) -> str:
    """One line: the status, the error code and message."""
    error = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(error, dict):
        text = body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
        return f"HTTP {status}: {text or 'no body'}"
    line = f"HTTP {status} {error.get('code')}: {error.get('message')}"
    if error.get("retryable"):
        line += " (retryable)"
    return line


def fetch_openapi(url: str, timeout: float) -> Any:
    request = urllib.request.Request(f"{url.rstrip('/')}/api/openapi.json")
    status, body = _send(request, url, timeout)
    reply = _json_reply(body)
    if status != 200 or not isinstance(reply, dict):
        raise CommandError(describe_error(status, reply, body))
    return reply


# -- help: the backend methods ------------------------------------------------------------


def catalogue_help() -> str:
    """The backend methods this server version has, with their params, for --help."""
    try:
        import attrs

        from unrealon.backendapi import register_backend_methods
        from unrealon.rpc import Caller, Registry
    except ImportError:  # pragma: no cover - the server's dependencies are absent
        return "\n`unrealon methods` lists the server's backend methods.\n"
    registry = Registry()
    register_backend_methods(registry)
    lines = ["", "backend methods (`unrealon methods` asks the server, application methods included):"]
    for spec in registry.methods(Caller.BACKEND):
        attrs.resolve_types(spec.params)
        fields = attrs.fields(spec.params)
        required = [f.name for f in fields if f.default is attrs.NOTHING]
        optional = [f.name for f in fields if f.default is not attrs.NOTHING]
        params = ", ".join(required) + (f" [{', '.join(optional)}]" if optional else "")
        lines.append(f"  {spec.name:28} {params}")
    lines += [
        "",
        "examples:",
        "  unrealon publish workspace:42 demo.hello --data '{\"text\": \"hi\"}'",
        "  unrealon call workspace.file_changed workspace_id=42 path=src/a.py change=modified",
        "  unrealon call session.message session_id=7 message_id=m1 role=assistant "
        "content=Hello seq:=0 done:=true",
        "  unrealon call presence.online user_ids:='[\"alice\", \"bob\"]'",
        "  unrealon token alice --rooms 'workspace:*' --info '{\"name\": \"Alice\"}'",
    ]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    """A parser whose help ends with the backend methods (when asked to)."""

    lists_methods = False

    def format_help(self) -> str:
        text = super().format_help()
        return text + catalogue_help() if self.lists_methods else text

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unrealon",
        description="Publish events and call backend methods through an unrealon-ws "
        "node's HTTP API, and mint development tokens.",
    )
    parser.lists_methods = True
    parser.add_argument("--version", action="version", version=f"unrealon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    api = _Parser(add_help=False)
    api.add_argument("--url", default=os.environ.get("UNREALON_API_URL", DEFAULT_URL),
                     help="the node's HTTP listener (env UNREALON_API_URL; default %(default)s)")
    api.add_argument("--api-key", help="an API key of the server (default: env UNREALON_API_KEY)")
    api.add_argument("--idempotency-key", metavar="KEY",
                     help="repeat-safe: a repeat within 5 minutes gets the first reply")
    api.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                     help="seconds to wait for the reply (default %(default)s)")

    publish = commands.add_parser(
        "publish", parents=[api],
        usage="unrealon publish ROOM EVENT [KEY=VALUE | KEY:=JSON ...] [--data JSON] [options]", help="publish any event to a room (the generic publish method)",
        description="Publish EVENT to ROOM; every member of the room receives it with "
        "the data. Fields given as KEY=VALUE (string) or KEY:=JSON go into the data too.",
    )
    publish.add_argument("room", help="e.g. workspace:42")
    publish.add_argument("event", help="the event name clients receive, e.g. demo.hello")
    publish.add_argument("--data", default="{}", help="the event's data, a JSON object")

    call: Any = commands.add_parser(
        "call", parents=[api],
        usage="unrealon call METHOD [KEY=VALUE | KEY:=JSON ...] [--data JSON] [options]", help="call a backend method (catalogue events and others)",
        description="Call a backend method with params from --data and KEY=VALUE "
        "(string) / KEY:=JSON fields; prints the result.",
    )
    call.lists_methods = True
    call.add_argument("method", help="e.g. workspace.file_changed (see below)")
    call.add_argument("--data", default="{}", help="the params, a JSON object")

    commands.add_parser(
        "methods", parents=[api], help="list the server's backend methods (from /api/openapi.json)"
    )

    token = commands.add_parser(
        "token", help="mint a development connection token (HS256)",
        description="Print an HS256 connection token signed with JWT_SECRET (or --secret), "
        "as `make token` does. For development: real tokens come from your backend.",
    )
    token.add_argument("user", nargs="?", default="dev", help='the sub claim (default "dev")')
    token.add_argument("--ttl", type=float, default=3600.0,
                       help="lifetime in seconds (default 3600)")
    token.add_argument("--rooms", nargs="+", default=None, metavar="PATTERN",
                       help='room patterns, space- or comma-separated (default "*": every room)')
    token.add_argument("--info", help="presence info, a JSON object of at most 1 KiB")
    token.add_argument("--methods", nargs="+", default=None, metavar="PATTERN",
                       help="backend methods the user may call, e.g. 'demo.*' (default: none)")
    token.add_argument("--secret", help="the HMAC key (default: env JWT_SECRET)")
    return parser


# -- the commands ------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Any:
    """The command's output (printed as JSON, or as text when a str)."""
    if args.command == "token":
        return run_token(args)
    if args.command == "methods":
        document = fetch_openapi(args.url, args.timeout)
        lines = []
        for path, item in sorted(document.get("paths", {}).items()):
            post = item.get("post") if isinstance(item, dict) else None
            if isinstance(post, dict):
                lines.append(f"{path.removeprefix('/api/'):28} {post.get('summary', '')}")
        return "\n".join(lines)
    key = api_key_from(args.api_key)
    data = json_object(args.data, "--data")
    fields = parse_fields(args.fields)
    if args.command == "publish":
        method = "publish"
        params: dict[str, Any] = {"room": args.room, "event": args.event,
                                  "data": {**data, **fields}}
    else:
        method = args.method
        params = {**data, **fields}
    return call_api(args.url, method, params, key,
                    idempotency_key=args.idempotency_key, timeout=args.timeout)


def run_token(args: argparse.Namespace) -> str:
    from unrealon.devtoken import (
        TokenError,
        check_methods,
        check_rooms,
        check_sub,
        mint,
        parse_info,
    )

    secret = args.secret if args.secret is not None else os.environ.get("JWT_SECRET", "")
    if not secret:
        raise CommandError("no key: set JWT_SECRET to the server's HMAC key or pass --secret "
                           "(make token uses the one make dev starts with)")
    if not args.ttl > 0:
        raise CommandError("--ttl must be a positive number of seconds")
    rooms = None
    if args.rooms is not None:
        rooms = [p for item in args.rooms for p in item.replace(",", " ").split()]
    try:
        check_sub(args.user)
        if rooms is not None:
            check_rooms(rooms)
        info = parse_info(args.info) if args.info is not None else None
        methods = None if args.methods is None else check_methods(
            [p for item in args.methods for p in item.replace(",", " ").split()])
    except TokenError as e:
        raise CommandError(str(e)) from None
    return mint(args.user, secret, args.ttl, rooms, info=info, methods=methods)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE fields are whatever is left, wherever it stands among the
    # options (argparse cannot mix a variable-length positional with them)
    args, extras = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extras and (args.command not in ("publish", "call")
                   or any(e.startswith("-") for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.fields = extras
    try:
        output = run(args)
    except CommandError as e:
        print(f"unrealon: {e}", file=sys.stderr)
        return 1
    if isinstance(output, str):
        print(output)
    else:
        print(json.dumps(output, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
