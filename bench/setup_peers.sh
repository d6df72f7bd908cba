#!/usr/bin/env bash
# Create bench/.venv-peers with django-ipc 1.0.9 (idempotent).
#
# django-ipc pins websockets<16 and redis<7, which conflict with the main
# venv (websockets 17, redis 8), so it lives in its own virtualenv. The
# benchmark harness looks for bench/.venv-peers/bin/python and records the
# django-ipc server as "n/a" when it is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-peers"
PY="${PYTHON:-python3}"
PIN="django-ipc==1.0.9"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("django-ipc") != "1.0.9")' 2>/dev/null; then
    echo "setup_peers: $VENV already has $PIN"
    exit 0
fi

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# uvloop is NOT installed here on purpose: django-ipc ships on the default
# asyncio loop, and we benchmark it as shipped (see bench/README.md).
"$VENV/bin/python" -m pip install --quiet "$PIN"
"$VENV/bin/python" -c 'import importlib.metadata as m; print("setup_peers: installed django-ipc", m.version("django-ipc"), "websockets", m.version("websockets"), "redis", m.version("redis"))'
