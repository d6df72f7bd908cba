# unrealon-ws: one node per container.
#
#   docker build -t unrealon-ws:latest .                       (make docker-build)
#   cp .env.example .env     # then set JWT_SECRET (and REDIS_URL) in it
#   docker run --rm -p 8765:8765 -p 127.0.0.1:8766:8766 --env-file .env \
#       --stop-timeout 30 unrealon-ws:latest                   (make docker-run)
#   or, without a file: docker run ... -e JWT_SECRET=... -e REDIS_URL=... unrealon-ws:latest
#
# Options after the image name go to the node: `docker run ... unrealon-ws:latest
# --rate-limit 100`. Settings come from the environment (PROTOCOL.md section 7,
# .env.example). With no JWT_SECRET / JWT_PUBLIC_KEY_FILE the node refuses to start.

FROM python:3.11-slim

# Don't write .pyc files at run time: site-packages belongs to root, and pip compiles
# every module when it installs it (pip ignores this variable). No pip version check
# and no "running pip as root" warning during the build.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# files mounted from the host (keys, a log volume) can be given to this UID.
RUN groupadd --system --gid 10001 unrealon \
 && useradd --system --uid 10001 --gid unrealon --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin unrealon

# Copy only what the build needs: the metadata (setup.cfg reads README.md as the long
# description), the package and the twistd plugin. .dockerignore keeps .env, .venv and
# any dropin.cache out of the build context.
WORKDIR /src
COPY pyproject.toml setup.cfg README.md constraints.txt ./
COPY unrealon ./unrealon
COPY twisted ./twisted

# Install as a normal package, not an editable one, so the image does not depend on
# /src. pip builds in an isolated environment with the backend pinned in pyproject.toml,
# then installs the dependencies from PyPI. All of them ship wheels or are pure Python,
# so slim needs no compiler.
RUN pip install --no-cache-dir -c constraints.txt '.[fast]' \
 && cd / && rm -rf /src

# The node reads ./.env from its working directory. Use an empty, root-owned directory
# so only the environment configures it (mount a file at /srv/unrealon-ws/.env to use
# one). The cache step below also runs here: `python -c` puts the working directory on
# sys.path, and from an empty one it sees only site-packages.
WORKDIR /srv/unrealon-ws

# Twisted finds plugins by scanning twisted/plugins/ and keeps the result in
# twisted/plugins/dropin.cache, next to the plugin files. At run time the node is not
# root and cannot write to site-packages. If the cache were missing it would log
# "Unable to write to plugin cache" and rescan on every start. So write the cache here,
# as root, after the last install. The --help run fails the build if the plugin or its
# options module is missing from the installed package. The log directory is for
# UNREALON_LOG_FILE=/var/log/unrealon-ws/node.json (put a volume there).
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && twist unrealon-ws --help > /dev/null \
 && install -d -o 10001 -g 10001 -m 0750 /var/log/unrealon-ws

# Listen on all interfaces inside the container. The defaults (127.0.0.1) would not be
# reachable through published ports. The health/metrics port must be reachable by the
# orchestrator's probes and by Prometheus, but do not publish it to the internet. The
# reverse proxy (deploy/nginx) only forwards /ws.
ENV UNREALON_WS=tcp:8765:interface=0.0.0.0 \
    UNREALON_HTTP=tcp:8766:interface=0.0.0.0
EXPOSE 8765 8766

# Everything from here on, including the process, runs as the unprivileged user.
USER 10001:10001

# Liveness, not readiness: /live answers 200 while the process runs, while /health goes
# 503 when Redis is unreachable or the node is draining. Restarting containers because Redis is down would only
# add a reconnect storm. Route readiness (e.g. a Kubernetes readinessProbe) to /health.
# slim has no curl, so use Python: urlopen raises on a refused connection, a timeout or
# any non-2xx status, and the uncaught exception makes the exit status 1 (unhealthy).
# The port is fixed here: if you move UNREALON_HTTP, override the healthcheck as well.
HEALTHCHECK --interval=15s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8766/live', timeout=2)"]

# `docker stop` sends SIGTERM (the default, stated here so nobody changes it). The node
# then reports "stopping", stops accepting, closes every connection with 1001, hands back
# in-flight ingress entries and exits within UNREALON_SHUTDOWN_TIMEOUT (default 10 s).
# Docker's default stop timeout is also 10 s, after which it sends SIGKILL, so give it
# more: `docker run --stop-timeout 30`, compose `stop_grace_period: 30s`, or a Kubernetes
# terminationGracePeriodSeconds above UNREALON_SHUTDOWN_TIMEOUT.
STOPSIGNAL SIGTERM

# The exec form makes twist PID 1, so it receives SIGTERM itself. No tini is needed: twist
# installs its own SIGTERM/SIGINT handlers (PID 1 ignores signals that have no handler)
# and starts no child processes whose zombies would need reaping. `twist` always runs in
# the foreground. UNREALON_LOG_FORMAT=json writes one JSON object per line (NDJSON) to
# stdout, each event once, which any log shipper reads; `-e UNREALON_LOG_FORMAT=text` gives
# readable lines for `docker logs`.
ENV UNREALON_LOG_FORMAT=json
ENTRYPOINT ["twist", "unrealon-ws"]
CMD []
