"""
``python -m unrealon.codegen [--check] [--root DIR] [--extension mod:func]
[--backend-methods FILE] [--backend-timeout S] [--backend-max-timeout S]``

Writes clients/openrpc.json, clients/typescript/src/index.ts (+ tsconfig.json)
and its compiled dist/, and clients/python/unrealon_client/api.py.  Output is
deterministic (sorted keys, no timestamps), so ``--check`` can regenerate
everything in a scratch directory, compile the TypeScript there with the
repository's pinned compiler (node_modules/typescript, from ``npm ci``), and
list every file that differs from the committed one: exit 1 if any does.

``--backend-methods FILE`` adds a project's backend methods (PROTOCOL.md
section 9): FILE is a JSON list of declarations, as ``python -m
unrealon_backend declarations --handlers <module>`` prints them.  Their
deadlines are computed as the node does, with ``--backend-timeout`` and
``--backend-max-timeout`` standing for the node's UNREALON_BACKEND_TIMEOUT and
UNREALON_BACKEND_MAX_TIMEOUT (default: the settings' defaults).  ``--check``
needs the same options as the run that wrote the files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from unrealon.codegen import python, typescript
from unrealon.codegen.openrpc import (
    DEFAULT_BACKEND_TIMEOUT,
    MAX_BACKEND_TIMEOUT,
    client_document,
    dump_json,
)
from unrealon.extensions import load_extension

TS_DIR = Path("clients/typescript")


def default_root() -> Path:
    """The checkout this package lives in (the parent of unrealon/)."""
    return Path(__file__).resolve().parents[2]


def sources(doc: dict[str, Any], root: Path) -> dict[Path, str]:
    """Every generated source file, relative to root, with its text."""
    files = {Path("clients/openrpc.json"): dump_json(doc)}
    doc = json.loads(files[Path("clients/openrpc.json")])  # generate from the file's content
    files.update(typescript.write_sources(doc, root))
    files.update(python.write_sources(doc, root))
    return files


def compile_typescript(root: Path, ts_dir: Path) -> None:
    """Run the pinned tsc on ts_dir (its tsconfig writes ts_dir/dist)."""
    tsc = root / "node_modules/typescript/bin/tsc"
    if not tsc.exists():
        raise SystemExit(
            f"{tsc} is missing: run `npm ci` (make install does) to compile clients/typescript"
        )
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not on PATH: Node.js 20+ compiles clients/typescript")
    shutil.rmtree(ts_dir / "dist", ignore_errors=True)
    done = subprocess.run(
        [node, str(tsc), "--strict", "-p", str(ts_dir)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"tsc failed:\n{done.stdout}{done.stderr}")


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def write(root: Path, files: dict[Path, str], compile_ts: bool) -> None:
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {rel}")
    if compile_ts:
        compile_typescript(root, root / TS_DIR)
        print(f"compiled {TS_DIR / 'dist'}")


def check(root: Path, files: dict[Path, str], compile_ts: bool) -> list[str]:
    """Paths (relative to root) whose committed content differs from a fresh run."""
    stale = [
        str(rel) for rel, text in files.items()
        if not (root / rel).exists() or (root / rel).read_text(encoding="utf-8") != text
    ]
    if compile_ts:
        with tempfile.TemporaryDirectory() as scratch:
            ts_dir = Path(scratch) / "typescript"
            shutil.copytree(root / TS_DIR / "src", ts_dir / "src")
            for rel, text in files.items():
                if rel.parts[:2] == TS_DIR.parts:
                    (ts_dir / rel.relative_to(TS_DIR)).write_text(text, encoding="utf-8")
            compile_typescript(root, ts_dir)
            fresh, committed = tree(ts_dir / "dist"), tree(root / TS_DIR / "dist")
            for name in sorted(set(fresh) | set(committed)):
                if fresh.get(name) != committed.get(name):
                    stale.append(str(TS_DIR / "dist" / name))
    return stale


def read_declarations(paths: list[Path]) -> list[Any]:
    """The declarations of every --backend-methods file (each a JSON list)."""
    declarations: list[Any] = []
    for path in paths:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--backend-methods {path}: {e}") from None
        if not isinstance(loaded, list):
            raise SystemExit(f"--backend-methods {path}: not a JSON list of declarations")
        declarations += loaded
    return declarations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unrealon.codegen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="list files that differ from a fresh run; exit 1 if any")
    parser.add_argument("--root", type=Path, default=None, help="the checkout (default: the one this package is in)")
    parser.add_argument("--extension", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="an application's registry extension whose methods the clients get")
    parser.add_argument("--no-compile", action="store_true", help="skip tsc (dist/ is neither written nor checked)")
    parser.add_argument("--backend-methods", action="append", default=[], type=Path, metavar="FILE",
                        help="a JSON list of backend method declarations whose methods the clients get")
    parser.add_argument("--backend-timeout", type=float, default=DEFAULT_BACKEND_TIMEOUT, metavar="S",
                        help="the nodes' UNREALON_BACKEND_TIMEOUT (default %(default)s)")
    parser.add_argument("--backend-max-timeout", type=float, default=MAX_BACKEND_TIMEOUT, metavar="S",
                        help="the nodes' UNREALON_BACKEND_MAX_TIMEOUT (default %(default)s)")
    args = parser.parse_args(argv)
    root = (args.root or default_root()).resolve()
    extensions = [load_extension(spec) for spec in args.extension]
    declarations = read_declarations(args.backend_methods)
    try:
        doc = client_document(extensions, declarations, args.backend_timeout, args.backend_max_timeout)
    except ValueError as e:
        raise SystemExit(f"--backend-methods: {e}") from None
    files = sources(doc, root)
    if not args.check:
        write(root, files, not args.no_compile)
        return 0
    stale = check(root, files, not args.no_compile)
    for path in stale:
        print(f"stale: {path}")
    if stale:
        print("generated clients are out of date: run `make generate-client` and commit the result")
        return 1
    print("generated clients are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
