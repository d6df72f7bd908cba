"""
Settings (PROTOCOL.md section 7): the names, the defaults, the order of the
sources (CLI > environment > .env > default), the .env reader, and the
refusal of every kind of bad value with one line naming both the
environment variable and the CLI option, never a secret.

All through L{load_config} with explicit C{cli}/C{environ}/C{dotenv}
mappings, so nothing here reads the real environment; the same checks in
real processes are in L{tests.test_process}.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from unrealon.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    Config,
    ConfigError,
    load_config,
    read_dotenv,
)
from unrealon.tap import Options

KEY = "k" * 48

#: PROTOCOL.md section 7: environment name -> (CLI option, default as parsed)
CONTRACT: dict[str, tuple[str, Any]] = {
    "UNREALON_WS": ("ws", "tcp:8765:interface=127.0.0.1"),
    "UNREALON_HTTP": ("http", "tcp:8766:interface=127.0.0.1"),
    "REDIS_URL": ("redis-url", None),
    "UNREALON_REDIS_SHARDS": ("redis-shards", ()),
    "JWT_SECRET": ("jwt-secret", None),
    "JWT_PUBLIC_KEY_FILE": ("jwt-public-key-file", ()),
    "JWT_ALGORITHMS": ("jwt-algorithms", ("HS256",)),
    "JWT_AUDIENCE": ("jwt-audience", None),
    "JWT_ISSUER": ("jwt-issuer", None),
    "JWT_LEEWAY": ("jwt-leeway", 5),
    "UNREALON_INSECURE_DEV": ("insecure-dev", False),
    "UNREALON_NODE_ID": ("node-id", None),
    "UNREALON_INGRESS_STREAM": ("ingress-stream", "stream:requests"),
    "UNREALON_INGRESS_GROUP": ("ingress-group", "rpc_group"),
    "UNREALON_CLAIM_IDLE": ("claim-idle", 30),
    "UNREALON_MAX_DELIVERIES": ("max-deliveries", 5),
    "UNREALON_DEAD_LETTER_STREAM": ("dead-letter-stream", "stream:requests:dead"),
    "UNREALON_AUTH_TIMEOUT": ("auth-timeout", 10),
    "UNREALON_PRESENCE_TTL": ("presence-ttl", 30),
    "UNREALON_HISTORY_SIZE": ("history-size", 1000),
    "UNREALON_HISTORY_TTL": ("history-ttl", 86400),
    "UNREALON_MAX_MESSAGE_SIZE": ("max-message-size", 65536),
    "UNREALON_SEND_BUFFER_LIMIT": ("send-buffer-limit", 1048576),
    "UNREALON_RATE_LIMIT": ("rate-limit", 50),
    "UNREALON_ALLOWED_ORIGINS": ("allowed-origins", ("*",)),
    "UNREALON_SHUTDOWN_TIMEOUT": ("shutdown-timeout", 10),
}

#: settings that must be positive numbers (PROTOCOL.md: sizes, rates and times)
POSITIVE = (
    "claim_idle",
    "max_deliveries",
    "auth_timeout",
    "presence_ttl",
    "history_size",
    "history_ttl",
    "max_message_size",
    "send_buffer_limit",
    "rate_limit",
    "shutdown_timeout",
)


def load(cli: dict[str, str] | None = None, environ: dict[str, str] | None = None,
         dotenv: dict[str, str] | None = None) -> Config:
    return load_config(cli=cli or {}, environ=environ or {}, dotenv=dotenv or {})


class ContractTests(SynchronousTestCase):
    """The settings table is the contract's."""

    def test_every_contract_setting_exists(self) -> None:
        """Each environment variable of section 7 has its setting, CLI option and default."""
        by_env = {s.env: s for s in SETTINGS}
        config = load(environ={"JWT_SECRET": KEY})
        for env, (option, default) in CONTRACT.items():
            self.assertIn(env, by_env)
            setting = by_env[env]
            self.assertEqual(setting.option, option)
            self.assertEqual(setting.cli, "--" + option)
            if env == "JWT_SECRET":
                continue
            if env == "UNREALON_NODE_ID":
                self.assertEqual(config.node_id, f"{socket.gethostname()}-8765")
                continue
            self.assertEqual(getattr(config, setting.name), default, env)

    def test_every_setting_is_an_option(self) -> None:
        """The twistd plugin's options are the settings table, each naming its variable in --help."""
        options = Options()
        help_text = str(options)
        for setting in SETTINGS:
            self.assertIn("--" + setting.option, help_text)
            self.assertIn(setting.env, help_text)

    def test_cli_values_from_options(self) -> None:
        """Parsed options become the CLI source: values by setting name, flags as "1", unset as None."""
        options = Options()
        options.parseOptions(["--ws", "tcp:9001", "--rate-limit", "7", "--insecure-dev"])
        values = options.cli_values()
        self.assertEqual(values["ws_endpoint"], "tcp:9001")
        self.assertEqual(values["rate_limit"], "7")
        self.assertEqual(values["insecure_dev"], "1")
        self.assertIsNone(values["http_endpoint"])
        self.assertIsNone(values["compression"])
        config = load(values)  # type: ignore[arg-type]
        self.assertEqual(config.rate_limit, 7.0)
        self.assertTrue(config.insecure_dev)

    def test_secrets_not_in_repr(self) -> None:
        """The JWT secret and the Redis URL (it may hold a password) are not in the config's repr."""
        config = load(environ={"JWT_SECRET": KEY, "REDIS_URL": "redis://:hunter2@localhost:16379/0"})
        self.assertNotIn(KEY, repr(config))
        self.assertNotIn("hunter2", repr(config))


class PrecedenceTests(SynchronousTestCase):
    """CLI, then environment, then .env, then the default."""

    CASES: tuple[tuple[str, str, str, str, Any, Any, Any, Any], ...] = (
        # name, cli, env, dotenv, parsed cli, parsed env, parsed dotenv, default
        ("rate_limit", "1", "2", "3", 1.0, 2.0, 3.0, 50.0),
        ("max_message_size", "1000", "2000", "3000", 1000, 2000, 3000, 65536),
        ("ws_endpoint", "tcp:1", "tcp:2", "tcp:3", "tcp:1", "tcp:2", "tcp:3",
         "tcp:8765:interface=127.0.0.1"),
        ("allowed_origins", "https://a.example", "https://b.example", "https://c.example",
         ("https://a.example",), ("https://b.example",), ("https://c.example",), ("*",)),
        ("node_id", "n1", "n2", "n3", "n1", "n2", "n3", None),
        ("shutdown_timeout", "0.5", "1.5", "2.5", 0.5, 1.5, 2.5, 10.0),
        ("jwt_algorithms", "HS512", "HS384", "HS256,HS512", ("HS512",), ("HS384",),
         ("HS256", "HS512"), ("HS256",)),
    )

    def test_order(self) -> None:
        """For each setting, every source wins over the ones after it."""
        for name, cli, env, dotenv, p_cli, p_env, p_dotenv, default in self.CASES:
            var = SETTINGS_BY_NAME[name].env
            base_env = {"JWT_SECRET": KEY}
            all_three = load({name: cli}, {**base_env, var: env}, {var: dotenv})
            self.assertEqual(getattr(all_three, name), p_cli, name)
            env_and_dotenv = load({}, {**base_env, var: env}, {var: dotenv})
            self.assertEqual(getattr(env_and_dotenv, name), p_env, name)
            only_dotenv = load({}, base_env, {var: dotenv})
            self.assertEqual(getattr(only_dotenv, name), p_dotenv, name)
            nothing = load({}, base_env, {})
            if default is not None:
                self.assertEqual(getattr(nothing, name), default, name)

    def test_secret_from_each_source(self) -> None:
        """The JWT secret itself may come from any source, and the CLI's is the one used."""
        for cli, env, dotenv, expected in (
            ({"jwt_secret": "c" * 40}, {"JWT_SECRET": "e" * 40}, {"JWT_SECRET": "d" * 40}, "c" * 40),
            ({}, {"JWT_SECRET": "e" * 40}, {"JWT_SECRET": "d" * 40}, "e" * 40),
            ({}, {}, {"JWT_SECRET": "d" * 40}, "d" * 40),
        ):
            config = load(cli, env, dotenv)
            self.assertEqual(config.jwt_secret, expected)
            self.assertEqual(len(config.jwt_keys), 1)

    def test_cli_none_means_not_given(self) -> None:
        """A CLI value of None (option not given) falls through to the environment."""
        config = load({"rate_limit": None}, {"JWT_SECRET": KEY, "UNREALON_RATE_LIMIT": "9"})  # type: ignore[dict-item]
        self.assertEqual(config.rate_limit, 9.0)

    def test_dotenv_read_from_working_directory(self) -> None:
        """Without an explicit dotenv mapping, ./.env of the working directory is read."""
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, ".env"), "w") as f:
            f.write(f"JWT_SECRET={KEY}\nUNREALON_RATE_LIMIT=4\n")
        cwd = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, cwd)
        config = load_config(cli={}, environ={"UNREALON_HISTORY_SIZE": "12"})
        self.assertEqual(config.rate_limit, 4.0)
        self.assertEqual(config.history_size, 12)


class DotenvTests(SynchronousTestCase):
    """The .env reader."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_syntax(self) -> None:
        """Comments, blank lines, export, single and double quotes, '=' in values, spaces."""
        path = self.write(
            "# a comment\n"
            "\n"
            "   # an indented comment\n"
            "A=1\n"
            "export B=two\n"
            "C='single quoted # not a comment'\n"
            'D="double quoted"\n'
            "E = spaced \n"
            "F=a=b=c\n"
            "G=\n"
            "H=\"unbalanced\n"
            "REDIS_URL=redis://:p%40ss@host:16379/0?db=0\n"
        )
        self.assertEqual(
            read_dotenv(path),
            {
                "A": "1",
                "B": "two",
                "C": "single quoted # not a comment",
                "D": "double quoted",
                "E": "spaced",
                "F": "a=b=c",
                "G": "",
                "H": '"unbalanced',
                "REDIS_URL": "redis://:p%40ss@host:16379/0?db=0",
            },
        )

    def test_missing_file(self) -> None:
        """A missing .env is no settings, not an error."""
        self.assertEqual(read_dotenv(self.mktemp()), {})

    def test_bad_line(self) -> None:
        """
        A line that is not KEY=VALUE is refused with the file and line number,
        without echoing the line (it may hold a secret).
        """
        for bad in ("JWT_SECRET supersecretvalue", "1BAD=supersecretvalue", "=supersecretvalue",
                    "export", "BAD-NAME=supersecretvalue"):
            path = self.write(f"OK=1\n\n{bad}\n")
            with self.assertRaises(ConfigError) as raised:
                read_dotenv(path)
            message = str(raised.exception)
            self.assertIn(f"{path}:3", message)
            self.assertNotIn("supersecretvalue", message)

    def test_unreadable(self) -> None:
        """A .env that exists but cannot be read (a directory) is a ConfigError."""
        path = self.mktemp()
        os.makedirs(path)
        self.assertRaises(ConfigError, read_dotenv, path)


class BadSettingTests(SynchronousTestCase):
    """Every kind of bad value stops startup with one clear line."""

    def assert_refused(self, name: str, value: str, secret: str | None = None,
                       extra: dict[str, str] | None = None) -> str:
        """C{value} for setting C{name} is refused from each source, naming env var and option."""
        setting = SETTINGS_BY_NAME[name]
        messages = []
        for cli, environ, dotenv in (
            ({name: value}, {}, {}),
            ({}, {setting.env: value}, {}),
            ({}, {}, {setting.env: value}),
        ):
            environ = {"JWT_SECRET": KEY, **(extra or {}), **environ}
            with self.assertRaises(ConfigError, msg=f"{name}={value!r}") as raised:
                load(cli, environ, dotenv)
            message = str(raised.exception)
            self.assertIn(setting.env, message)
            self.assertIn(setting.cli, message)
            self.assertNotIn("\n", message)
            if secret is not None:
                self.assertNotIn(secret, message)
            messages.append(message)
        return messages[0]

    def test_endpoints(self) -> None:
        """Unparseable endpoint strings for both listeners."""
        for name in ("ws_endpoint", "http_endpoint"):
            for value in ("foo:1", "8765", "tcp:", "tcp:abc", "tcp:70000", "tcp:-1",
                          "tcp:80:bogus=1", "unix:", "", "   "):
                self.assert_refused(name, value)

    def test_algorithms(self) -> None:
        """Unknown algorithms, "none" in any case or among others, and an empty list."""
        for value in ("HS999", "none", "None", "NONE", "HS256,none", ",", "", "RS256 ES256"):
            self.assert_refused("jwt_algorithms", value)

    def test_algorithm_without_key(self) -> None:
        """An allow-list no configured key can verify (RS256 with only an HMAC secret)."""
        self.assert_refused("jwt_algorithms", "RS256")

    def test_key_files(self) -> None:
        """A key file that does not exist, is a directory, or is not a key."""
        directory = self.mktemp()
        os.makedirs(directory)
        garbage = os.path.join(directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a key at all\n")
        for value in ("/nonexistent/key.pem", directory, garbage):
            self.assert_refused("jwt_public_key_files", value, extra={"JWT_ALGORITHMS": "RS256"})

    def test_non_positive_numbers(self) -> None:
        """Sizes, rates and times: zero, negative, not a number, NaN, infinity."""
        for name in POSITIVE:
            for value in ("0", "-1", "abc", "", "nan", "inf", "-0.5"):
                self.assert_refused(name, value)
        for name in ("max_message_size", "history_size", "max_deliveries", "send_buffer_limit"):
            self.assert_refused(name, "1.5")
        self.assert_refused("jwt_leeway", "-1")

    def test_origins(self) -> None:
        """Origins with a path, without a scheme, with a trailing slash, or an empty list."""
        for value in ("https://app.example.com/", "https://app.example.com/path", "app.example.com",
                      "https://ok.example,not an origin", ",", "https://a.example?x=1"):
            self.assert_refused("allowed_origins", value)

    def test_redis_urls(self) -> None:
        """
        Bad Redis URLs -- wrong scheme, TLS (unsupported), a port or database
        that is not a number, an unknown query parameter, a unix:// URL
        without a path -- are refused without showing the password.
        """
        for value in (
            "http://:hunter2pw@localhost:16379/0",
            "rediss://:hunter2pw@localhost:16379/0",
            "redis://:hunter2pw@localhost:notaport/0",
            "redis://:hunter2pw@localhost:16379/db0",
            "redis://:hunter2pw@localhost:16379/0?bogus=1",
            "unix://",
            "localhost:16379",
        ):
            self.assert_refused("redis_url", value, secret="hunter2pw")

    def test_sentinel_urls(self) -> None:
        """
        PROTOCOL.md section 7's Sentinel form starts a node: one or more
        Sentinels and the master's name; a bad one is refused without its
        password.
        """
        for value in ("redis+sentinel://localhost/mymaster",
                      "redis+sentinel://:pw@s1:26379,s2,s3:26380/mymaster/2"):
            config = load({"redis_url": value}, {"JWT_SECRET": KEY})
            self.assertEqual(config.redis_url, value)
        for value in ("redis+sentinel://:hunter2pw@s1:26379",
                      "redis+sentinel://:hunter2pw@s1:port/mymaster"):
            self.assert_refused("redis_url", value, secret="hunter2pw")

    def test_redis_shards(self) -> None:
        """
        Shards are REDIS_URL-like URLs, space-separated, in order; each is
        checked like REDIS_URL (its password never shown), none twice, and
        they need REDIS_URL, the first shard, which they must not repeat.
        """
        config = load({"redis_url": "redis://a:6379/0",
                       "redis_shards": "redis://b:6379/0  unix:///run/r.sock?db=1"},
                      {"JWT_SECRET": KEY})
        self.assertEqual(config.redis_shards, ("redis://b:6379/0", "unix:///run/r.sock?db=1"))
        self.assertEqual(load({}, {"JWT_SECRET": KEY}).redis_shards, ())
        self.assert_refused("redis_shards", "redis://b/0 rediss://:hunter2pw@c/0",
                            secret="hunter2pw")
        self.assert_refused("redis_shards", "redis://b/0 redis://b/0")
        for cli in ({"redis_shards": "redis://b/0"},
                    {"redis_url": "redis://a/0", "redis_shards": "redis://b/0 redis://a/0"}):
            with self.assertRaises(ConfigError) as caught:
                load(cli, {"JWT_SECRET": KEY})
            self.assertIn("UNREALON_REDIS_SHARDS (--redis-shards)", str(caught.exception))

    def test_flags_and_levels(self) -> None:
        """A flag that is not yes/no, an unknown log level."""
        self.assert_refused("insecure_dev", "maybe")
        self.assert_refused("compression", "2")
        self.assert_refused("log_level", "loud")

    def test_good_values_accepted(self) -> None:
        """The shapes the contract names are accepted."""
        config = load(
            {
                "ws_endpoint": "unix:/run/unrealon/ws.sock",
                "http_endpoint": "systemd:domain=INET:index=0",
                "redis_url": "unix:///run/redis.sock?db=2",
                "allowed_origins": "https://app.example.com, http://localhost:3000",
                "jwt_algorithms": "HS256, HS512",
                "rate_limit": "0.5",
            },
            {"JWT_SECRET": KEY},
        )
        self.assertEqual(config.ws_endpoint, "unix:/run/unrealon/ws.sock")
        self.assertEqual(config.redis_url, "unix:///run/redis.sock?db=2")
        self.assertEqual(config.allowed_origins, ("https://app.example.com", "http://localhost:3000"))
        self.assertEqual(config.jwt_algorithms, ("HS256", "HS512"))
        self.assertEqual(config.rate_limit, 0.5)
        load({"redis_url": "redis://:pw@localhost:16379/3", "ws_endpoint": "tcp6:8765:interface=\\:\\:"},
             {"JWT_SECRET": KEY})


class KeyRequiredTests(SynchronousTestCase):
    """No JWT key: refuse, unless UNREALON_INSECURE_DEV is 1/true."""

    def test_refused_without_key(self) -> None:
        """The refusal names JWT_SECRET/--jwt-secret, the key file option and the escape hatch."""
        for environ in ({}, {"UNREALON_INSECURE_DEV": "0"}, {"UNREALON_INSECURE_DEV": "false"},
                        {"JWT_SECRET": ""}, {"JWT_SECRET": "   "}):
            with self.assertRaises(ConfigError) as raised:
                load({}, environ)
            message = str(raised.exception)
            for name in ("JWT_SECRET", "--jwt-secret", "JWT_PUBLIC_KEY_FILE", "UNREALON_INSECURE_DEV"):
                self.assertIn(name, message)

    def test_insecure_dev(self) -> None:
        """UNREALON_INSECURE_DEV=1 or true (any source) starts without a key."""
        for cli, environ, dotenv in (
            ({}, {"UNREALON_INSECURE_DEV": "1"}, {}),
            ({}, {"UNREALON_INSECURE_DEV": "true"}, {}),
            ({}, {}, {"UNREALON_INSECURE_DEV": "TRUE"}),
            ({"insecure_dev": "1"}, {}, {}),
        ):
            config = load(cli, environ, dotenv)
            self.assertTrue(config.insecure_dev)
            self.assertEqual(config.jwt_keys, ())


class ShortSecretTests(SynchronousTestCase):
    """A JWT_SECRET under 32 bytes is refused (RFC 7518), unless UNREALON_INSECURE_DEV."""

    def test_refused(self) -> None:
        for secret in ("s3cret", "x" * 31):
            with self.assertRaises(ConfigError) as raised:
                load({}, {"JWT_SECRET": secret})
            message = str(raised.exception)
            self.assertIn("JWT_SECRET (--jwt-secret)", message)
            self.assertIn("at least 32 bytes", message)
            self.assertNotIn(secret, message.replace("secrets.token_urlsafe", ""))

    def test_long_enough_or_insecure_dev(self) -> None:
        self.assertEqual(len(load({}, {"JWT_SECRET": "x" * 32}).jwt_keys), 1)
        config = load({}, {"JWT_SECRET": "s3cret", "UNREALON_INSECURE_DEV": "1"})
        self.assertTrue(config.insecure_dev)
