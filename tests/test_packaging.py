"""
Packaging and deployment files: the wheel, the Dockerfile's plugin-cache step,
C{.env.example}, the README's settings table, the Dockerfile, the systemd
units, the nginx example and the runners' help.

Everything here is checked by building or running the real thing where this
machine can (a wheel built the way the Docker build builds it, installed into a
scratch directory and scanned by Twisted's plugin system exactly as the
Dockerfile's C{RUN} line does; the socket-activated unit's C{ExecStart} run on
descriptors handed over the way systemd hands them over) and by reading the
files where it cannot (no Docker engine here).  A missing tool (pip,
systemd-analyze, nginx) skips its test.
"""

from __future__ import annotations

import ast
import configparser
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from unrealon.config import SETTINGS, SETTINGS_BY_NAME, load_config, read_dotenv

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SYSTEMD = ROOT / "deploy" / "systemd"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
NGINX = ROOT / "deploy" / "nginx" / "unrealon-ws.conf"

#: the Dockerfile's plugin-cache step, as the brief and twisted-notes give it
CACHE_STEP = 'python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"'

#: subprocess time limits (s): generous, only reached when something hangs
BUILD_TIMEOUT = 120
RUN_TIMEOUT = 30


def _run(argv: Sequence[str | os.PathLike[str]], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured as text (stderr merged)."""
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, timeout=timeout, check=False,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _venv_tool(name: str) -> Path:
    """A console script of the interpreter running the tests, or skip."""
    tool = BIN / name
    if not tool.exists():
        raise SkipTest(f"{tool} is not installed")
    return tool


def scratch(case: SynchronousTestCase) -> Path:
    """A new, empty, absolute directory under the test's temporary directory."""
    path = Path(case.mktemp()).resolve()
    path.mkdir(parents=True)
    return path


def _node_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any setting, systemd or pip variable."""
    drop = {s.env for s in SETTINGS} | {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


# -- Dockerfile ---------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """
    (INSTRUCTION, arguments) pairs of a Dockerfile: comments dropped,
    backslash continuations joined (comment lines inside them too, as Docker does).
    """
    instructions: list[tuple[str, str]] = []
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(pending)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a continuation")
    return instructions


def _dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _index(instructions: list[tuple[str, str]], keyword: str, last: bool = False) -> int:
    found = [i for i, (k, _) in enumerate(instructions) if k == keyword]
    if not found:
        raise AssertionError(f"Dockerfile has no {keyword}")
    return found[-1] if last else found[0]


def _docker_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                name, sep, value = item.partition("=")
                if sep:
                    env[name] = value
    return env


def _copied_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions take."""
    sources: list[str] = []
    for keyword, args in instructions:
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


def _cache_step_code(instructions: list[tuple[str, str]]) -> str:
    """The Python code of the Dockerfile's plugin-cache RUN step."""
    for keyword, args in instructions:
        if keyword == "RUN" and "getPlugins" in args:
            for command in args.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["python", "-c"] and "getPlugins" in words[2]:
                    return words[2]
    raise AssertionError("Dockerfile has no RUN step regenerating the plugin cache")


# -- the wheel, built once per test process --------------------------------------

_built: dict[str, Path] = {}


def build_wheel(case: SynchronousTestCase) -> tuple[Path, Path]:
    """
    Build the wheel from exactly what the Dockerfile COPYs, the way the Docker
    build does (pip, isolated build environment), in a scratch directory so the
    checkout gets no C{build/} and a stale one cannot leak in.

    @return: the wheel and the source copy it was built from.
    """
    if "wheel" in _built:
        return _built["wheel"], _built["src"]
    if _run([sys.executable, "-m", "pip", "--version"], cwd=ROOT).returncode:
        raise SkipTest("pip is not available")
    src = scratch(case)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for source in _copied_sources(_dockerfile()):
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, src / source, ignore=ignore)
        else:
            shutil.copy2(origin, src / source)
    dist = scratch(case)
    result = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-w", dist, src],
        cwd=src, timeout=BUILD_TIMEOUT,
    )
    if result.returncode and "Installing build dependencies: finished with status 'error'" in result.stdout:
        # setuptools/wheel for the isolated build could not be fetched (offline).
        raise SkipTest("the build backend cannot be installed:\n" + result.stdout[-2000:])
    case.assertEqual(result.returncode, 0, result.stdout)
    wheels = sorted(dist.glob("unrealon_ws-*.whl"))
    case.assertEqual(len(wheels), 1, result.stdout)
    _built.update(wheel=wheels[0], src=src)
    return wheels[0], src


#: run by the scratch interpreter after the cache step: what Twisted sees
PROBE = r"""
import json, pickle, sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
out = {"tapnames": sorted(makers), "sys_path": sys.path}
maker = makers.get("unrealon-ws")
if maker is not None:
    options = maker.options()
    import unrealon
    import twisted.plugins.unrealon_ws as plugin
    out["plugin_file"] = plugin.__file__
    out["unrealon_file"] = unrealon.__file__
    out["options"] = sorted(o.rstrip("=") for o in options.longOpt)
with open(sys.argv[1], "rb") as f:
    cache = pickle.load(f)
out["cached"] = {k: [p.name for p in v.plugins] for k, v in cache.items()}
print(json.dumps(out))
"""


class WheelTests(SynchronousTestCase):
    """The wheel, and the Dockerfile's plugin-cache step on the installed wheel."""

    def test_wheel_contents(self) -> None:
        """
        The wheel carries the twistd plugin, every module of the package and
        the py.typed marker, and never a C{twisted/__init__.py} or
        C{twisted/plugins/__init__.py}, which would replace Twisted's own
        package when installed.
        """
        wheel, src = build_wheel(self)
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
        self.assertIn("twisted/plugins/unrealon_ws.py", names)
        self.assertIn("unrealon/py.typed", names)
        self.assertIn("unrealon/tap.py", names)
        self.assertIn("unrealon/engine/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual([n for n in names if n.endswith("dropin.cache")], [])
        self.assertEqual([n for n in names if n.startswith("tests/")], [])
        modules = {
            p.relative_to(src).as_posix()
            for p in (src / "unrealon").rglob("*.py")
        }
        self.assertEqual(sorted(modules - names), [], "modules missing from the wheel")

    def test_plugin_cache_step(self) -> None:
        """
        The Dockerfile's cache step, run against the installed wheel (Twisted
        and the dependencies from this venv, but not the checkout), writes
        C{dropin.cache} next to the installed plugin. Twisted then finds
        tapname "unrealon-ws" there, the options load from the installed
        package, and a second scan finds the cache fresh and does not rewrite
        it, so a read-only image never tries to.
        """
        wheel, _ = build_wheel(self)
        site = scratch(self)
        result = _run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
             "--disable-pip-version-check", "--target", site, wheel],
            cwd=ROOT,
        )
        self.assertEqual(result.returncode, 0, result.stdout)
        plugins = site / "twisted" / "plugins"
        self.assertTrue((plugins / "unrealon_ws.py").is_file(), "plugin not installed")
        self.assertFalse((site / "twisted" / "__init__.py").exists())
        self.assertFalse((plugins / "__init__.py").exists())
        cache = plugins / "dropin.cache"
        self.assertFalse(cache.exists())

        # -S: no site module, so no .pth file (the editable install's puts the
        # checkout on sys.path); an empty working directory for `python -c`.
        paths = dict.fromkeys([str(site), sysconfig.get_paths()["purelib"],
                               sysconfig.get_paths()["platlib"]])
        env = _node_env(PYTHONPATH=os.pathsep.join(paths))
        empty = scratch(self)
        code = _cache_step_code(_dockerfile())
        step = _run([sys.executable, "-S", "-c", code], cwd=empty, env=env)
        self.assertEqual(step.returncode, 0, step.stdout)
        self.assertNotIn("Unable to write to plugin cache", step.stdout)
        self.assertTrue(cache.is_file(), "the cache step wrote no dropin.cache")
        written = cache.stat().st_mtime_ns

        probe = _run([sys.executable, "-S", "-c", PROBE, cache], cwd=empty, env=env)
        self.assertEqual(probe.returncode, 0, probe.stdout)
        seen: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
        self.assertNotIn(str(ROOT), seen["sys_path"])
        self.assertIn("unrealon-ws", seen["tapnames"])
        self.assertTrue(seen["plugin_file"].startswith(str(site)), seen["plugin_file"])
        self.assertTrue(seen["unrealon_file"].startswith(str(site)), seen["unrealon_file"])
        self.assertEqual(seen["cached"].get("unrealon_ws"), ["unrealon_ws"])
        self.assertLessEqual({s.option for s in SETTINGS}, set(seen["options"]))
        self.assertEqual(cache.stat().st_mtime_ns, written, "a fresh cache was rewritten")


# -- the checkout ---------------------------------------------------------------


class CheckoutTests(SynchronousTestCase):
    """The plugin layout in the checkout."""

    def test_no_init_in_twisted_dirs(self) -> None:
        """
        C{twisted/} and C{twisted/plugins/} have no C{__init__.py}: they are
        portions of Twisted's packages, never packages of their own.
        """
        self.assertTrue((ROOT / "twisted" / "plugins" / "unrealon_ws.py").is_file())
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())

    def test_plugin_is_import_light(self) -> None:
        """
        The plugin module imports nothing that could install a reactor:
        discovery imports it before twist/twistd choose one.
        """
        tree = ast.parse((ROOT / "twisted" / "plugins" / "unrealon_ws.py").read_text("utf-8"))
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
        light = {"__future__", "twisted.application.service", "twisted.plugin",
                 "twisted.python.usage", "zope.interface"}
        self.assertLessEqual(imported, light)

    def test_plugin_cache_ignored(self) -> None:
        """Twisted's C{dropin.cache} is never committed or sent to a Docker build."""
        self.assertIn("dropin.cache", (ROOT / ".gitignore").read_text("utf-8").split())
        ignored = (ROOT / ".dockerignore").read_text("utf-8").split()
        for pattern in ("**/dropin.cache", ".env", ".venv/", ".git/"):
            self.assertIn(pattern, ignored)


# -- .env.example and the README --------------------------------------------------

_ASSIGNMENT = re.compile(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> tuple[dict[str, tuple[bool, str]], list[str]]:
    """
    The C{NAME=value} lines of C{.env.example}, active or commented out
    (C{#NAME=value}), as name -> (active, value); and the file's lines.
    """
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    entries: dict[str, tuple[bool, str]] = {}
    for line in lines:
        match = _ASSIGNMENT.match(line.strip())
        if match:
            commented, name, value = match.groups()
            if name in entries:
                raise AssertionError(f".env.example names {name} twice")
            entries[name] = (not commented, value)
    return entries, lines


class EnvExampleTests(SynchronousTestCase):
    """C{.env.example} matches the settings table of L{unrealon.config}."""

    def test_every_setting_listed(self) -> None:
        """Every setting's variable is listed once, and nothing else."""
        entries, _ = env_example()
        self.assertEqual(sorted(entries), sorted(s.env for s in SETTINGS))

    def test_defaults_match(self) -> None:
        """Each line shows the setting's default (empty when it has none)."""
        entries, _ = env_example()
        for setting in SETTINGS:
            if setting.env in entries:
                self.assertEqual(entries[setting.env][1], setting.default or "", setting.env)

    def test_secrets_empty_and_copy_changes_nothing(self) -> None:
        """
        Secrets are active and empty; no active line sets a value. A copy used
        as C{.env} or C{docker --env-file} then changes nothing until edited,
        and in particular does not move the Docker image's 0.0.0.0 listeners
        back to 127.0.0.1.
        """
        entries, _ = env_example()
        for setting in SETTINGS:
            active, value = entries.get(setting.env, (False, ""))
            if setting.secret:
                self.assertEqual((active, value), (True, ""), setting.env)
        self.assertEqual([n for n, (active, value) in entries.items() if active and value], [])
        self.assertEqual(read_dotenv(ENV_EXAMPLE),
                         {s.env: "" for s in SETTINGS if s.secret})

    def test_each_line_commented(self) -> None:
        """Each setting has a one-line comment above it naming its CLI option."""
        _, lines = env_example()
        for number, line in enumerate(lines):
            match = _ASSIGNMENT.match(line.strip())
            if not match or match.group(2) not in {s.env for s in SETTINGS}:
                continue
            setting = next(s for s in SETTINGS if s.env == match.group(2))
            above = lines[number - 1].strip() if number else ""
            self.assertTrue(above.startswith("# ") and not _ASSIGNMENT.match(above),
                            f"no comment above {setting.env}")
            self.assertIn(f"({setting.cli})", above, setting.env)

    def test_values_load_as_defaults(self) -> None:
        """
        Loading every value of the file (commented ones included) gives the
        same configuration as loading nothing: the shown defaults are the real
        ones, as parsed.
        """
        entries, _ = env_example()
        key = {"JWT_SECRET": "packaging-test-secret-0123456789abcdef"}
        listed = {name: value for name, (_, value) in entries.items()}
        from_file = load_config(cli={}, environ={}, dotenv={**listed, **key})
        defaults = load_config(cli={}, environ={}, dotenv=key)
        for setting in SETTINGS:
            self.assertEqual(getattr(from_file, setting.name), getattr(defaults, setting.name),
                             setting.env)


class ReadmeTests(SynchronousTestCase):
    """The README's settings table."""

    def test_readme_documents_every_setting(self) -> None:
        """
        Each setting has a row in the README's table that names both its
        variable and its CLI option (skipped until the README has a table).
        """
        readme = ROOT / "README.md"
        rows = [line for line in (readme.read_text("utf-8") if readme.exists() else "").splitlines()
                if line.lstrip().startswith("|")]

        def names(row: str, word: str) -> bool:
            return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", row) is not None

        if not any(names(row, s.env) for row in rows for s in SETTINGS):
            raise SkipTest("README.md has no settings table yet")
        missing = [s.env for s in SETTINGS
                   if not any(names(row, s.env) and names(row, s.cli) for row in rows)]
        self.assertEqual(missing, [])


# -- Dockerfile ---------------------------------------------------------------------


class DockerfileTests(SynchronousTestCase):
    """The Dockerfile, read (no Docker engine here)."""

    def test_base_and_install(self) -> None:
        """
        python:3.11-slim; the package is installed as a normal, non-editable
        package with its fast JSON codec, within the tested versions of
        constraints.txt.
        """
        instructions = _dockerfile()
        self.assertEqual(instructions[0], ("FROM", "python:3.11-slim"))
        installs = [a for k, a in instructions if k == "RUN" and "pip install" in a]
        self.assertEqual(len(installs), 1, installs)
        self.assertIn("pip install --no-cache-dir -c constraints.txt '.[fast]'", installs[0])
        self.assertNotIn("-e", shlex.split(installs[0].split("&&")[0]))
        for source in ("pyproject.toml", "setup.cfg", "README.md", "constraints.txt", "unrealon",
                       "twisted"):
            self.assertIn(source, _copied_sources(instructions))

    def test_cache_step_as_root_after_install(self) -> None:
        """The plugin cache is written after the install and before the switch to the user."""
        instructions = _dockerfile()
        step = next(i for i, (k, a) in enumerate(instructions)
                    if k == "RUN" and CACHE_STEP in a)
        install = next(i for i, (k, a) in enumerate(instructions)
                       if k == "RUN" and "pip install" in a)
        self.assertLess(install, step)
        self.assertLess(step, _index(instructions, "USER"))
        self.assertEqual(_cache_step_code(instructions),
                         "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))")

    def test_runs_as_non_root(self) -> None:
        """The last USER is not root and comes before ENTRYPOINT and CMD; nothing runs as root after it."""
        instructions = _dockerfile()
        user = _index(instructions, "USER", last=True)
        name = instructions[user][1].split(":")[0]
        self.assertNotIn(name, ("root", "0", ""))
        self.assertLess(user, _index(instructions, "ENTRYPOINT"))
        self.assertLess(user, _index(instructions, "CMD"))
        self.assertEqual([k for k, _ in instructions[user:] if k == "RUN"], [])

    def test_entrypoint_listeners_and_signals(self) -> None:
        """
        twist (exec form, so it is PID 1 and gets SIGTERM) with NDJSON logs
        (UNREALON_LOG_FORMAT, not twist's record-separated JSON); both listeners on
        0.0.0.0 on the exposed ports; STOPSIGNAL SIGTERM.
        """
        instructions = dict(_dockerfile())
        self.assertEqual(json.loads(instructions["ENTRYPOINT"]), ["twist", "unrealon-ws"])
        self.assertEqual(instructions["STOPSIGNAL"], "SIGTERM")
        env = _docker_env(_dockerfile())
        self.assertEqual(env["UNREALON_LOG_FORMAT"], "json")
        self.assertEqual(env["UNREALON_WS"], "tcp:8765:interface=0.0.0.0")
        self.assertEqual(env["UNREALON_HTTP"], "tcp:8766:interface=0.0.0.0")
        self.assertEqual(sorted(instructions["EXPOSE"].split()), ["8765", "8766"])

    def test_healthcheck_live(self) -> None:
        """The health check asks /live on the health port, with Python (slim has no curl)."""
        instructions = dict(_dockerfile())
        check = instructions["HEALTHCHECK"]
        self.assertIn("http://127.0.0.1:8766/live", check)
        self.assertIn("urllib.request", check)
        self.assertNotIn("curl", check)
        command = json.loads(check[check.index("CMD") + 3:])
        self.assertEqual(command[:2], ["python", "-c"])
        compile(command[2], "<healthcheck>", "exec")


# -- systemd ---------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """
    A systemd unit as section -> key -> every value (systemd allows repeated
    keys); backslash continuations joined.  It must also parse as INI.
    """
    text = path.read_text(encoding="utf-8")
    ini = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read_string(text, source=str(path))
    unit: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    joined = re.sub(r"\\\n\s*", " ", text)
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if section is None or not sep:
            raise AssertionError(f"{path.name}: unexpected line {line!r}")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def _one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    if not values:
        raise AssertionError(f"no {key}= in [{section}]")
    return values[-1]


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", text)
    if not match:
        raise AssertionError(f"cannot read time span {text!r}")
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def _services() -> list[Path]:
    return sorted(SYSTEMD.glob("*.service"))


def _sockets_of(service: str) -> dict[str, tuple[Path, str]]:
    """FileDescriptorName -> (socket unit, ListenStream) of the sockets activating C{service}."""
    found: dict[str, tuple[Path, str]] = {}
    for path in sorted(SYSTEMD.glob("*.socket")):
        unit = parse_unit(path)
        if _one(unit, "Socket", "Service") == service:
            name = _one(unit, "Socket", "FileDescriptorName")
            if name in found:
                raise AssertionError(f"FileDescriptorName={name} used twice")
            found[name] = (path, _one(unit, "Socket", "ListenStream"))
    return found


def _systemd_endpoints(argv: list[str]) -> dict[str, dict[str, str]]:
    """CLI option -> parameters of each C{systemd:} endpoint on a command line."""
    endpoints: dict[str, dict[str, str]] = {}
    for option, value in itertools.pairwise(argv):
        if option.startswith("--") and value.startswith("systemd:"):
            endpoints[option] = dict(p.split("=", 1) for p in value.split(":")[1:])
    return endpoints


SOCKET_SERVICE = "unrealon-ws-socket.service"


class SystemdTests(SynchronousTestCase):
    """The units in deploy/systemd."""

    def test_units_parse(self) -> None:
        """Every unit parses (INI, strict=False) and has its main section."""
        units = sorted(SYSTEMD.glob("*.service")) + sorted(SYSTEMD.glob("*.socket"))
        self.assertLessEqual(
            {"unrealon-ws.service", SOCKET_SERVICE, "unrealon-ws.socket"},
            {p.name for p in units},
        )
        for path in units:
            unit = parse_unit(path)
            self.assertIn("Unit", unit, path.name)
            self.assertIn("Service" if path.suffix == ".service" else "Socket", unit, path.name)

    def test_service_settings(self) -> None:
        """
        Every service runs the venv's twist with the environment file, is
        hardened, restarts on failure, stops with SIGTERM, allows 65536
        descriptors, and waits longer than the node's default drain.
        """
        drain = float(SETTINGS_BY_NAME["shutdown_timeout"].default or "0")
        for path in _services():
            unit = parse_unit(path)
            argv = shlex.split(_one(unit, "Service", "ExecStart"))
            self.assertTrue(argv[0].startswith("/") and argv[0].endswith("/bin/twist"), argv)
            self.assertIn("unrealon-ws", argv)
            self.assertIn("/etc/unrealon-ws/env", unit["Service"]["EnvironmentFile"])
            expected = {
                "Restart": "on-failure", "KillSignal": "SIGTERM", "LimitNOFILE": "65536",
                "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                "DynamicUser": "yes",
            }
            for key, value in expected.items():
                self.assertEqual(_one(unit, "Service", key), value, (path.name, key))
            self.assertGreater(_seconds(_one(unit, "Service", "TimeoutStopSec")), drain, path.name)

    def test_socket_names_match(self) -> None:
        """
        The socket-activated service's C{systemd:} endpoints name exactly the
        FileDescriptorNames of the sockets that activate it, with the right
        address family; it requires those sockets.
        """
        unit = parse_unit(SYSTEMD / SOCKET_SERVICE)
        endpoints = _systemd_endpoints(shlex.split(_one(unit, "Service", "ExecStart")))
        self.assertIn("--ws", endpoints)
        sockets = _sockets_of(SOCKET_SERVICE)
        self.assertEqual(sorted(e.get("name", "") for e in endpoints.values()), sorted(sockets))
        for params in endpoints.values():
            self.assertNotIn("index", params)
            path, listen = sockets[params["name"]]
            family = "INET" if re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", listen) else "INET6"
            self.assertEqual(params["domain"], family, (path.name, listen))
        requires = " ".join(unit["Unit"].get("Requires", [])).split()
        self.assertLessEqual({p.name for p, _ in sockets.values()}, set(requires))

    def test_systemd_analyze_verify(self) -> None:
        """C{systemd-analyze verify} reports nothing about the units (venv path replaced)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        twist = _venv_tool("twist")
        units = scratch(self)
        for path in sorted(SYSTEMD.iterdir()):
            text = path.read_text("utf-8").replace("/opt/unrealon-ws/venv/bin/twist", str(twist))
            name = path.name.replace("@.", "@check.")
            (units / name).write_text(text, "utf-8")
        result = _run([analyze, "verify", *sorted(p.name for p in units.iterdir())], cwd=units)
        self.assertEqual(result.returncode, 0, result.stdout)
        complaints = [line for line in result.stdout.splitlines() if "unrealon-ws" in line]
        self.assertEqual(complaints, [])

    def test_socket_activated_exec_start_serves(self) -> None:
        """
        The socket-activated C{ExecStart}, given listening sockets the way
        systemd passes them (descriptors from 3, C{LISTEN_FDS},
        C{LISTEN_FDNAMES}, C{LISTEN_PID} of the exec'd process), answers
        /live on the health socket and the WebSocket handshake on the ws
        socket, and stops on SIGTERM.
        """
        twist = _venv_tool("twist")
        unit = parse_unit(SYSTEMD / SOCKET_SERVICE)
        argv = shlex.split(_one(unit, "Service", "ExecStart"))
        argv[0] = str(twist)
        listening: dict[str, socket.socket] = {}
        for name, (_, listen) in sorted(_sockets_of(SOCKET_SERVICE).items()):
            host = listen.rpartition(":")[0] or "127.0.0.1"
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(sock.close)
            sock.bind((host, 0))
            sock.listen(16)
            listening[name] = sock
        names = sorted(listening)
        fds = [listening[n].fileno() for n in names]
        # Move the descriptors to 3, 4, ... and exec twist: LISTEN_PID is then
        # twist's own PID, as under systemd.
        wrapper = (
            "import fcntl, os, sys\n"
            "fds = [fcntl.fcntl(int(f), fcntl.F_DUPFD, 100) for f in sys.argv[1].split(',')]\n"
            "for i, fd in enumerate(fds):\n"
            "    os.dup2(fd, 3 + i)\n"
            "    os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),\n"
            "                  LISTEN_FDNAMES=sys.argv[2])\n"
            "os.execv(sys.argv[3], sys.argv[3:])\n"
        )
        workdir = scratch(self)
        log = (workdir / "node.log").open("w+b")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [sys.executable, "-c", wrapper, ",".join(map(str, fds)), ":".join(names), *argv],
            pass_fds=fds, cwd=workdir, env=_node_env(UNREALON_INSECURE_DEV="1"),
            stdout=log, stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if process.poll() is None:
                process.kill()
            process.wait(RUN_TIMEOUT)

        self.addCleanup(stop)
        ports = {n: s.getsockname()[1] for n, s in listening.items()}
        # Only the node holds the sockets now: if it dies, connecting fails at
        # once instead of waiting in a backlog nobody serves.
        for sock in listening.values():
            sock.close()

        def output() -> str:
            log.seek(0)
            return log.read().decode("utf-8", "replace")

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{ports['health']}/live", timeout=RUN_TIMEOUT
            ) as response:
                self.assertEqual(response.status, 200)
                self.assertEqual(json.loads(response.read())["status"], "alive")
            with socket.create_connection(("127.0.0.1", ports["ws"]), timeout=RUN_TIMEOUT) as ws:
                ws.sendall(
                    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                status = ws.makefile("rb").readline()
            self.assertTrue(status.startswith(b"HTTP/1.1 101"), status)
        except OSError as e:
            self.fail(f"{e}\n{output()}")
        process.send_signal(signal.SIGTERM)
        code = process.wait(RUN_TIMEOUT)
        # systemd counts both a 0 exit and an end by SIGTERM as a clean stop.
        self.assertIn(code, (0, -signal.SIGTERM), output())
        self.assertIn("stopping", output())


# -- nginx ----------------------------------------------------------------------


class NginxTests(SynchronousTestCase):
    """The reverse proxy example."""

    def _text(self) -> str:
        return "\n".join(line.split("#", 1)[0] for line in NGINX.read_text("utf-8").splitlines())

    def test_websocket_proxy(self) -> None:
        """
        Only C{location = /ws} is proxied, with the upgrade headers, HTTP/1.1
        and a read timeout above the node's ping interval; /health, /live and
        /metrics are not.
        """
        text = self._text()
        locations = re.findall(r"location\s+([^{]*?)\s*\{(.*?)\}", text, re.S)
        proxied = [where for where, body in locations if "proxy_pass" in body]
        self.assertEqual(proxied, ["= /ws"])
        body = dict(locations)["= /ws"]
        self.assertIn("proxy_http_version 1.1;", body)
        self.assertIn("proxy_set_header Upgrade $http_upgrade;", body)
        self.assertIn("proxy_set_header Connection $connection_upgrade;", body)
        timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", body)
        assert timeout is not None
        ping = float(SETTINGS_BY_NAME["ping_interval"].default or "0")
        self.assertGreater(int(timeout.group(1)), ping)
        for path in ("/health", "/live", "/metrics"):
            self.assertFalse(any(path in where for where in proxied), path)
        self.assertIn("listen 443 ssl;", text)

    def test_nginx_accepts_config(self) -> None:
        """C{nginx -t} accepts the file inside an http block (certificate and log paths replaced)."""
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx is None:
            raise SkipTest("nginx is not installed")
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        prefix = scratch(self)
        made = _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                     "-subj", "/CN=ws.example.com", "-keyout", prefix / "key.pem",
                     "-out", prefix / "cert.pem"], cwd=prefix)
        self.assertEqual(made.returncode, 0, made.stdout)
        conf = NGINX.read_text("utf-8")
        conf = re.sub(r"/etc/letsencrypt/live/[^;]*/fullchain\.pem", str(prefix / "cert.pem"), conf)
        conf = re.sub(r"/etc/letsencrypt/live/[^;]*/privkey\.pem", str(prefix / "key.pem"), conf)
        conf = conf.replace("/var/log/nginx/", f"{prefix}/")
        (prefix / "unrealon-ws.conf").write_text(conf, "utf-8")
        temp = " ".join(f"{kind}_temp_path {prefix}/{kind};"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(
            f"error_log {prefix}/error.log;\npid {prefix}/nginx.pid;\nevents {{}}\n"
            f"http {{ access_log {prefix}/access.log; {temp}\n"
            f"include {prefix}/unrealon-ws.conf; }}\n",
            "utf-8",
        )
        result = _run([nginx, "-t", "-p", prefix, "-c", prefix / "nginx.conf",
                       "-e", prefix / "error.log"], cwd=prefix)
        self.assertEqual(result.returncode, 0, result.stdout)


# -- the runners ------------------------------------------------------------------


class RunnerHelpTests(SynchronousTestCase):
    """Both runners list every setting's option."""

    def _check_help(self, argv: list[str]) -> None:
        empty = scratch(self)
        result = _run(argv, cwd=empty, env=_node_env())
        self.assertEqual(result.returncode, 0, result.stdout)
        missing = [
            s.cli for s in SETTINGS
            if not re.search(rf"(?<![\w-]){re.escape(s.cli)}(?![\w-])", result.stdout)
        ]
        self.assertEqual(missing, [], result.stdout)
        self.assertEqual([s.env for s in SETTINGS if s.env not in result.stdout], [])

    def test_twist_help(self) -> None:
        """C{twist unrealon-ws --help} lists every option and its variable."""
        self._check_help([str(_venv_tool("twist")), "unrealon-ws", "--help"])

    def test_twistd_help(self) -> None:
        """C{twistd unrealon-ws --help} lists every option and its variable."""
        self._check_help([str(_venv_tool("twistd")), "unrealon-ws", "--help"])
