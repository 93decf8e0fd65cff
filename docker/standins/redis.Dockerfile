# Stand-in for the official redis:7-alpine, for machines that cannot reach a Docker registry
# (tools/docker_bases.py builds it, tagged redis:7-alpine, only when that tag cannot be pulled).
# Debian bookworm's redis-server (7.0) behaving as the official image does for this project:
# data in /data, run as the redis user, `redis-server ARGS` or bare `--options` as the
# command, and protected mode off (the official image builds Redis with it off: a container
# is reached over its network, never over loopback).
ARG BASE
FROM ${BASE}
LABEL cifar-svc.standin="redis:7-alpine built from Debian bookworm by tools/docker_bases.py"
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        redis-server >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
