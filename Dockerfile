# HiveMind Worker for headless hosts: `hivemind-worker run --headless` in a container,
# running tasks on the HOST's Docker engine through its mounted socket (see README, Docker).
#
#   python3 build.py exe                      # dist/hivemind-worker-onedir/, as in the .deb
#   docker build -t hivemind-worker .          # or --build-arg BASE_IMAGE=...
#
# The one-folder app (not the one-file executable, which would unpack ~200 MB into the
# container at every start) links only against glibc (>= 2.36, Debian 12) for headless use, so
# any such base works; it brings its own Python. Add python3 to the base only if you want
# the no-Docker process sandbox (DOCKER_ENABLED=false); python3-minimal is not enough, the
# sandbox's launcher needs the `resource` module.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG VERSION=unknown
LABEL org.opencontainers.image.title="HiveMind Worker" \
      org.opencontainers.image.description="Donate spare compute to the HiveMind platform (headless worker)" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

COPY dist/hivemind-worker-onedir/ /opt/hivemind-worker/
RUN ln -s /opt/hivemind-worker/hivemind-worker /usr/local/bin/hivemind-worker

# Not root inside: the worker needs only the Docker socket (give it the socket's group
# with --group-add) and its own folder. HIVEMIND_HOME must be the same path inside and
# on the host, because task workspaces under it are bind-mounted by the host's engine.
RUN useradd --system --uid 10001 --home-dir /var/lib/hivemind-worker --create-home hivemind
ENV HIVEMIND_HOME=/var/lib/hivemind-worker \
    DOCKER_ENABLED=true \
    PYTHONUNBUFFERED=1
# The settings, by the names in DESIGN.md; unset ones take their defaults.
#   NODE_POOL_ADDRESS  host:port of the pool          NODE_ID  this machine's id
#   MAX_CPU_CORES  MAX_MEMORY_GB  MAX_DISK_GB  MAX_CONCURRENT_TASKS  TASK_TIMEOUT
#   HEARTBEAT_INTERVAL  DOCKER_ENABLED  DOCKER_NETWORK  WORK_DIR  LOG_DIR  (README: all of them)
#   HIVEMIND_ACCOUNT  the account logged in with `hivemind-worker login`
USER hivemind
WORKDIR /var/lib/hivemind-worker
VOLUME ["/var/lib/hivemind-worker"]

# Docker stops containers with SIGTERM: the worker then finishes running tasks and reports
# them (drain), so give `docker stop` a timeout as long as drain_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hivemind-worker"]
CMD ["run", "--headless"]
