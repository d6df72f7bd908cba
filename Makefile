# unrealon-ws: the two set-up commands are `make install` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TWIST := $(VENV)/bin/twist
DEV_JWT_SECRET ?= unrealon-dev-secret-not-for-production-0000
DEV_API_KEY ?= unrealon-dev-api-key-0000
UNREALON := $(VENV)/bin/unrealon
WS_PORT ?= 8765
HTTP_PORT ?= 8766
LOG_FILE ?= logs/unrealon-ws.json

.PHONY: install install-ipc dev health logs test test-unit run-prod docker-build docker-run constraints \
        generate-client check-clients lint bench bench-backend bench-ai-memory bench-foreign bench-peers bench-smoke token clean

install:
	@PYTHON=$(PYTHON) sh scripts/check-prereqs install
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, so twisted/plugins/ here is found
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench,fast]' --config-settings editable_mode=compat
	# the backend package (backend/): Django's side, only redis-py
	$(PY) -m pip install --quiet -c constraints.txt -e ./backend
	npm ci --no-audit --no-fund
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@$(TWIST) --help | grep -q unrealon-ws && echo "installed: twist unrealon-ws is available"

install-ipc: install

# What `make dev` prints names only what differs from the defaults: the CLI
# reads UNREALON_API_KEY itself when it is exported, and defaults to port 8766.
DEV_KEY_ENV = $(if $(UNREALON_API_KEY),,UNREALON_API_KEY=$(DEV_API_KEY) )
DEV_URL_ARG = $(if $(filter 8766,$(HTTP_PORT)),,--url http://127.0.0.1:$(HTTP_PORT) )
DEV_WS_ARG = $(if $(filter 8765,$(WS_PORT)),,&ws=ws://127.0.0.1:$(WS_PORT)/ws)

dev:
	@mkdir -p $(dir $(LOG_FILE))
	@echo "unrealon-ws for development: ws://127.0.0.1:$(WS_PORT)/ws, HTTP API http://127.0.0.1:$(HTTP_PORT)/api (docs/http-api.md)"
	@echo "  token:   make token USER_ID=alice"
	@echo "  browser: python3 -m http.server 8000, then open http://127.0.0.1:8000/examples/browser/#workspace=42$(DEV_WS_ARG)&token=<token>"
	@echo "  publish: $(DEV_KEY_ENV)$(UNREALON) publish $(DEV_URL_ARG)workspace:42 demo.hello --data '{\"text\":\"hi\"}'"
	JWT_SECRET=$${JWT_SECRET:-$(DEV_JWT_SECRET)} UNREALON_API_KEY=$${UNREALON_API_KEY:-$(DEV_API_KEY)} \
	  UNREALON_LOG_FILE=$(LOG_FILE) $(TWIST) --log-format=text unrealon-ws \
	  --ws tcp:$(WS_PORT):interface=127.0.0.1 --http tcp:$(HTTP_PORT):interface=127.0.0.1

# make token [USER_ID=alice] [TTL=seconds] [ROOMS='workspace:* session:1'] [INFO='{"name":"Alice"}'] [METHODS='demo.*']
token:
	@JWT_SECRET=$${JWT_SECRET:-$(DEV_JWT_SECRET)} $(UNREALON) token $(if $(USER_ID),'$(USER_ID)') \
	  $(if $(TTL),--ttl '$(TTL)') $(if $(ROOMS),--rooms '$(ROOMS)') $(if $(INFO),--info '$(INFO)') \
	  $(if $(METHODS),--methods '$(METHODS)')

health:
	@curl -fsS http://127.0.0.1:$(HTTP_PORT)/health; echo

logs:
	@mkdir -p logs; touch $(LOG_FILE); tail -F $(LOG_FILE)

test:
	@PYTHON=$(PY) sh scripts/check-prereqs test
	$(PY) -m twisted.trial -j2 tests
	$(PY) bench/run.py --smoke
	$(PY) bench/backend_rpc.py --smoke
	$(PY) bench/ai_history_memory.py --smoke
	$(PY) bench/foreign_events.py --smoke
	$(PY) bench/shard_costs.py --smoke
	$(PY) bench/redis_costs.py --smoke

test-unit:
	$(PY) -m twisted.trial tests

run-prod:
	UNREALON_LOG_FORMAT=json $(TWIST) unrealon-ws

docker-build:
	docker build -t unrealon-ws:latest .

docker-run:
	@test -f .env || { echo "make docker-run reads .env: cp .env.example .env and set JWT_SECRET (or run docker run -e JWT_SECRET=... yourself, see the README)" >&2; exit 1; }
	docker run --rm --stop-timeout 30 -p 8765:8765 -p 127.0.0.1:8766:8766 --env-file .env unrealon-ws:latest

generate-client:
	$(PY) -m unrealon.codegen

check-clients:
	$(PY) -m unrealon.codegen --check

lint:
	$(VENV)/bin/ruff check unrealon backend tests twisted bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Pin what the venv holds now as the tested set (after an upgrade that passed make test).
constraints:
	(sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^pip==\|^setuptools==\|^wheel==') > constraints.tmp && mv constraints.tmp constraints.txt

bench:
	$(PY) bench/run.py
	$(PY) bench/backend_rpc.py
	$(PY) bench/ai_history_memory.py
	$(PY) bench/foreign_events.py
	$(PY) bench/redis_costs.py
	$(PY) bench/shard_costs.py

bench-foreign:
	$(PY) bench/foreign_events.py

bench-ai-memory:
	$(PY) bench/ai_history_memory.py

bench-backend:
	$(PY) bench/backend_rpc.py

bench-peers:
	bash bench/setup_peers.sh

bench-smoke:
	$(PY) bench/run.py --smoke
	$(PY) bench/ai_history_memory.py --smoke
	$(PY) bench/foreign_events.py --smoke

clean:
	rm -rf _trial_temp* .mypy_cache .ruff_cache build dist *.egg-info
