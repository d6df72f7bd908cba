"""
Node settings: one table (C{settings.json}), four sources, one frozen L{Config}.

Every setting has a CLI option and an environment variable (PROTOCOL.md
section 7).  The CLI wins, then the environment, then a C{.env} file in the
working directory, then the default.  Every value is parsed and checked here,
before anything starts, so a node never runs half-configured: a bad value
raises L{ConfigError} whose message is one line naming both the environment
variable and the CLI option, and never echoing a secret.

This module is imported by the twistd plugin's option parser, so it must not
import the reactor or anything that does (txredisapi does).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from unrealon.auth import (
    JWTSettings,
    KeyConfigError,
    VerificationKey,
    load_keys,
    validate_algorithms,
)
from unrealon.redisurl import parse_redis_url

#: shortest JWT_SECRET accepted (RFC 7518 section 3.2: an HMAC key at least as
#: long as the hash, 256 bits for HS256), except with UNREALON_INSECURE_DEV
MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting has a value the node cannot run with."""


@attrs.frozen
class Setting:
    """One row of the settings table."""

    name: str  # attribute of Config
    env: str
    option: str  # long CLI option, without dashes
    default: str | None
    parse: Callable[[str], Any]
    doc: str
    secret: bool = False

    @property
    def cli(self) -> str:
        return "--" + self.option


# -- parsers: str -> value, ValueError with a message on bad input ----------


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("must be a positive integer") from None
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("must be a positive number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("must be a number >= 0") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number >= 0")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/true/yes or 0/false/no")


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _optional_text(text: str) -> str | None:
    return text.strip() or None


_ENDPOINT_KINDS = ("tcp", "tcp6", "unix", "ssl", "systemd", "fd")


def _endpoint(text: str) -> str:
    """
    Check an endpoint string's shape without building it: building a
    systemd endpoint needs the inherited descriptors, and this runs before the
    reactor exists.  L{twisted.internet.endpoints} parses it for real at start.
    """
    from unrealon._compat.endpoints import parse_server

    text = text.strip()
    kind = text.split(":", 1)[0]
    if kind not in _ENDPOINT_KINDS:
        raise ValueError(
            "must be a Twisted endpoint string such as tcp:8765:interface=127.0.0.1"
        )
    try:
        _, args, kwargs = parse_server(text)
    except Exception:
        raise ValueError("is not a valid endpoint string") from None
    if kind in ("tcp", "tcp6", "ssl"):
        port: Any = kwargs.get("port", args[0] if args else None)
        try:
            number = int(port)
        except (TypeError, ValueError):
            raise ValueError("needs a numeric port, e.g. tcp:8765") from None
        if not 0 <= number <= 65535:
            raise ValueError("port must be 0..65535")
    if kind == "unix" and not ((args and args[0]) or kwargs.get("address")):
        raise ValueError("needs a path, e.g. unix:/run/unrealon/ws.sock")
    return text


def _redis_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    # rediss:// is refused: txredisapi's TLS does not verify certificates.
    if not re.match(r"^(redis|redis\+sentinel|unix)://", text):
        raise ValueError(
            "must start with redis://, redis+sentinel:// or unix:// (put TLS in a local proxy)"
        )
    if text.startswith("unix://") and len(text.split("?")[0]) <= len("unix://"):
        raise ValueError("unix:// needs a socket path")
    # The full check (port, database, query, credentials) is the parser the
    # engine connects with; its messages never contain the password.
    parse_redis_url(text)
    return text


def _redis_urls(text: str) -> tuple[str, ...]:
    urls = []
    for number, part in enumerate(text.split(), start=1):
        try:
            url = _redis_url(part)
        except ValueError as e:
            raise ValueError(f"URL {number}: {e}") from None
        if url in urls:
            raise ValueError(f"URL {number} is listed twice")
        urls.append(url)
    return tuple(u for u in urls if u is not None)


def _algorithms(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("must name at least one algorithm")
    try:
        return validate_algorithms(names)
    except KeyConfigError as e:
        raise ValueError(str(e)) from None


def _key_files(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("must list origins (scheme://host[:port]) or be *")
    for origin in origins:
        if origin != "*" and not _ORIGIN_RE.match(origin):
            raise ValueError(
                f"{origin!r} is not an origin (scheme://host[:port], no path)"
            )
    return origins


_EXTENSION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _extensions(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if not _EXTENSION_RE.match(name):
            raise ValueError(f"{name!r} is not module.path:function")
    return names


def _log_format(text: str) -> str | None:
    fmt = text.strip().lower()
    if not fmt:
        return None  # the runner's choice
    if fmt not in ("text", "json"):
        raise ValueError("must be text or json")
    return fmt


#: an HTTP API key: printable ASCII without spaces or commas (the list separator)
_API_KEY_RE = re.compile(r"^[\x21-\x2b\x2d-\x7e]{16,}$")


def _api_keys(text: str) -> tuple[str, ...]:
    """
    Comma-separated HTTP API keys; empty: the API is off.  Never echoes a
    key (the message says which one, by position).
    """
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    for number, key in enumerate(keys, 1):
        if not _API_KEY_RE.match(key):
            raise ValueError(
                f"key {number} of {len(keys)} must be at least 16 printable ASCII "
                "characters, without spaces"
            )
    return keys


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in ("debug", "info", "warn", "error", "critical"):
        raise ValueError("must be one of debug, info, warn, error, critical")
    return level


#: the parsers the settings table names in its C{type} column
_PARSERS: dict[str, Callable[[str], Any]] = {
    "positive_int": _positive_int,
    "positive_float": _positive_float,
    "non_negative_float": _non_negative_float,
    "flag": _flag,
    "text": _text,
    "optional_text": _optional_text,
    "endpoint": _endpoint,
    "redis_url": _redis_url,
    "redis_urls": _redis_urls,
    "algorithms": _algorithms,
    "key_files": _key_files,
    "origins": _origins,
    "extensions": _extensions,
    "api_keys": _api_keys,
    "log_level": _log_level,
    "log_format": _log_format,
}


def _option(env: str) -> str:
    """The CLI option of a variable: UNREALON_CLAIM_IDLE -> claim-idle, REDIS_URL -> redis-url."""
    return env.removeprefix("UNREALON_").lower().replace("_", "-")


def _read_settings() -> tuple[Setting, ...]:
    """
    The settings table, C{settings.json} next to this module: data, so the
    defaults are stated once and the docs and checks read the same rows.
    """
    rows = json.loads((Path(__file__).parent / "settings.json").read_text("utf-8"))["settings"]
    return tuple(
        Setting(name=row["name"], env=row["env"], option=_option(row["env"]),
                default=row["default"], parse=_PARSERS[row["type"]], doc=row["doc"],
                secret=row.get("secret", False))
        for row in rows
    )


SETTINGS: tuple[Setting, ...] = _read_settings()
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@attrs.frozen(kw_only=True)
class Config:
    """
    Everything a node needs to know, checked.  Made only by L{load_config}:
    the defaults are the settings table's (L{SETTINGS}), stated once.
    """

    ws_endpoint: str
    http_endpoint: str
    redis_url: str | None = attrs.field(repr=False)
    #: further Redis instances rooms are sharded over (L{unrealon.engine.roomshards})
    redis_shards: tuple[str, ...] = attrs.field(repr=False)
    jwt_secret: str | None = attrs.field(repr=False)
    jwt_public_key_files: tuple[str, ...]
    jwt_algorithms: tuple[str, ...]
    jwt_audience: str | None
    jwt_issuer: str | None
    jwt_leeway: float
    insecure_dev: bool
    node_id: str
    ingress_stream: str
    ingress_group: str
    claim_idle: float
    max_deliveries: int
    ingress_max_in_flight: int
    dead_letter_stream: str
    auth_timeout: float
    presence_ttl: float
    history_size: int
    history_ttl: float
    #: streamed messages (PROTOCOL.md section 5.1)
    stream_gap_wait: float
    max_message_size: int
    send_buffer_limit: int
    rate_limit: float
    allowed_origins: tuple[str, ...]
    shutdown_timeout: float
    max_connections_per_user: int
    max_unauthenticated: int
    ping_interval: float
    ping_timeout: float
    handshake_timeout: float
    compression: bool
    extensions: tuple[str, ...]
    #: HTTP API keys (PROTOCOL.md section 8); empty: the API is off
    api_keys: tuple[str, ...] = attrs.field(repr=False)
    #: the backend both ways (PROTOCOL.md section 9)
    events_stream: str
    events_maxlen: int
    connection_events: bool
    backend_stream: str
    backend_timeout: float
    backend_max_timeout: float
    backend_max_calls: int
    log_level: str
    log_format: str | None
    log_file: str | None
    #: loaded from jwt_secret and jwt_public_key_files
    jwt_keys: tuple[VerificationKey, ...] = attrs.field(repr=False)

    def jwt_settings(self) -> JWTSettings:
        return JWTSettings(
            keys=self.jwt_keys,
            algorithms=self.jwt_algorithms,
            audience=self.jwt_audience,
            issuer=self.jwt_issuer,
            leeway=self.jwt_leeway,
        )


def read_dotenv(path: str | os.PathLike[str]) -> dict[str, str]:
    """
    Read C{KEY=VALUE} lines; C{#} comments, blank lines, C{export } and
    matching quotes are allowed.  A missing file is an empty mapping.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _default_node_id(ws_endpoint: str) -> str:
    match = re.match(r"^(?:tcp6?|ssl):(?:port=)?(\d+)", ws_endpoint)
    host = socket.gethostname() or "unrealon"
    return f"{host}-{match.group(1)}" if match else host


def _check_table() -> None:
    """The settings table and L{Config} name the same fields (checked at import)."""
    table = {s.name for s in SETTINGS}
    fields = {f.name for f in attrs.fields(Config)} - {"jwt_keys"}
    if table != fields:
        raise RuntimeError(f"settings.json and Config disagree: {sorted(table ^ fields)}")


_check_table()


def load_config(
    cli: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv: Mapping[str, str] | None = None,
) -> Config:
    """
    Resolve every setting from its sources in order and check it.

    @param cli: raw option values by setting name (None when not given).
    @param environ: the environment (default C{os.environ}).
    @param dotenv: the C{.env} values (default: read C{./.env}).
    """
    cli = cli or {}
    environ = os.environ if environ is None else environ
    dotenv = read_dotenv(".env") if dotenv is None else dotenv
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: str | None = cli.get(setting.name)
        if raw is None:
            raw = environ.get(setting.env)
        if raw is None:
            raw = dotenv.get(setting.env)
        if raw is None:
            raw = setting.default
        if raw is None:
            values[setting.name] = None
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as e:
            shown = "" if setting.secret else f", got {raw!r}"
            raise ConfigError(
                f"bad setting {setting.env} ({setting.cli}): {e}{shown}"
            ) from None
    if values["node_id"] is None:
        values["node_id"] = _default_node_id(values["ws_endpoint"])
    _check_shards(values["redis_url"], values["redis_shards"])
    try:
        values["jwt_keys"] = load_keys(values["jwt_secret"], values["jwt_public_key_files"])
    except KeyConfigError as e:
        env = SETTINGS_BY_NAME["jwt_public_key_files"]
        raise ConfigError(f"bad setting {env.env} ({env.cli}): {e}") from None
    secret = values["jwt_secret"]
    if secret is not None and len(secret.encode("utf-8")) < MIN_SECRET_BYTES and not values[
        "insecure_dev"
    ]:
        env = SETTINGS_BY_NAME["jwt_secret"]
        raise ConfigError(
            f"bad setting {env.env} ({env.cli}): must be at least {MIN_SECRET_BYTES} bytes "
            f"(RFC 7518: an HS256 key as long as the hash); generate one with "
            f"python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    if not values["jwt_keys"] and not values["insecure_dev"]:
        raise ConfigError(
            "no JWT key: set JWT_SECRET (--jwt-secret) or JWT_PUBLIC_KEY_FILE "
            "(--jwt-public-key-file); UNREALON_INSECURE_DEV=1 (--insecure-dev) "
            "starts without one, for development only"
        )
    _check_key_algorithms(values["jwt_keys"], values["jwt_algorithms"])
    return Config(**values)


def _check_shards(redis_url: str | None, shards: Sequence[str]) -> None:
    """Shards extend REDIS_URL (shard 0): they need it, and must not repeat it."""
    if not shards:
        return
    env, first = SETTINGS_BY_NAME["redis_shards"], SETTINGS_BY_NAME["redis_url"]
    if redis_url is None:
        raise ConfigError(f"bad setting {env.env} ({env.cli}): needs {first.env} "
                          f"({first.cli}), the first shard")
    if redis_url in shards:
        raise ConfigError(f"bad setting {env.env} ({env.cli}): lists {first.env} "
                          "again (it is the first shard already)")


_FAMILY = {"HS": "HMAC", "RS": "RSA", "PS": "RSA", "ES": "EC"}


def _check_key_algorithms(
    keys: Sequence[VerificationKey], algorithms: Sequence[str]
) -> None:
    """Refuse an allow-list no configured key can verify: a silent lock-out."""
    if not keys:
        return
    families = {k.family for k in keys}
    usable = [a for a in algorithms if _FAMILY.get(a[:2]) in families]
    if not usable:
        env = SETTINGS_BY_NAME["jwt_algorithms"]
        raise ConfigError(
            f"bad setting {env.env} ({env.cli}): no configured key can verify "
            f"{', '.join(algorithms)}"
        )
