# The service's images; docker-compose.yml builds each by its target. Each holds what its
# role runs and nothing else (no tests, training plots or linters: requirements/dev.txt):
#   runtime  web (gunicorn), fetcher, flower, the client: requirements/runtime.txt, no TensorFlow
#   worker   prediction workers: requirements/worker.txt (OpenVINO, no TensorFlow) and the model
#   gpu      the worker on TensorFlow's CUDA build (requirements/model.txt; `--profile gpu`)
#   nginx    the reverse proxy in front of web: Debian's nginx, docker/nginx.conf
# Give a target: without one, docker builds the last stage (gpu). The stages are in this order
# because the legacy builder (docker-compose v1's) builds every stage above the target, needed
# or not: the CPU images never build the GPU stages, and runtime builds nothing of TensorFlow.
#
# Packages are installed in throwaway stages (deps-*) and only the installed tree (/opt/venv)
# is copied into the images. From docker/wheels/ when it holds wheels (`python -m
# tools.docker_bases` links them there, for machines whose containers cannot reach the Python
# package index), with --no-index; from the index when it is empty. Either way no wheel file
# ends up in an image.

FROM python:3.11-slim AS python
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LANG=C.UTF-8

# --- dependencies (throwaway) ----------------------------------------------------------------
FROM python AS deps
COPY requirements /requirements
COPY docker/wheels /wheels
# venv-install -r FILE: into /opt/venv, from the wheelhouse when there is one (only from it,
# unless ALSO_FROM_INDEX is set); then pip itself leaves the venv (an installer is no runtime package).
RUN printf '%s\n' '#!/bin/sh' 'set -e' \
        'if ls /wheels/*.whl >/dev/null 2>&1; then' \
        '  set -- --find-links /wheels "$@"; [ -n "$ALSO_FROM_INDEX" ] || set -- --no-index "$@"; fi' \
        '/opt/venv/bin/pip install --no-warn-script-location "$@"' \
        '/opt/venv/bin/python -m pip uninstall -y -q pip' > /usr/local/bin/venv-install \
    && chmod +x /usr/local/bin/venv-install && python -m venv /opt/venv

FROM deps AS deps-runtime
RUN venv-install -r /requirements/runtime.txt

# --- what every service image shares -----------------------------------------------------------
FROM python AS app
# A fixed unprivileged user (the same uid in every image: web and fetcher share the image volume).
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/images && chown app:app /data/images
ENV PATH=/opt/venv/bin:$PATH STORAGE_DIR=/data/images MODEL_DIR=/app/models/cifar10-airbench
WORKDIR /app

FROM app AS runtime
COPY --from=deps-runtime /opt/venv /opt/venv
COPY shared shared
COPY web web
COPY worker worker
COPY client client
COPY tools tools
RUN python -m compileall -q /app
USER app
EXPOSE 8000
# The config by path, not python:web.gunicorn_conf: importing the web package would create the
# metrics files before on_starting has prepared PROMETHEUS_MULTIPROC_DIR.
CMD ["gunicorn", "-c", "/app/web/gunicorn_conf.py", "-b", "0.0.0.0:8000", "web.wsgi:app"]

# --- the reverse proxy -------------------------------------------------------------------------
# On the same base as the others (the official nginx image may be out of reach; Debian's nginx
# is one apt-get away from any Debian image).
FROM python:3.11-slim AS nginx
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nginx >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --no-create-home --uid 10001 --user-group app
COPY docker/nginx.conf /etc/nginx/nginx.conf.template
COPY docker/nginx-start.sh /usr/local/bin/nginx-start
USER app
EXPOSE 8080
CMD ["nginx-start"]

# --- the prediction workers -----------------------------------------------------------------
FROM deps AS deps-worker
RUN venv-install -r /requirements/worker.txt

FROM app AS worker
COPY --from=deps-worker /opt/venv /opt/venv
COPY shared shared
COPY worker worker
COPY models models
RUN python -m compileall -q /app
USER app
CMD ["python", "-m", "worker", "--queues", "predict"]

FROM deps AS deps-gpu
# model.txt with TensorFlow's CUDA build of the pinned version instead of the CPU build. Its CUDA
# wheels (GBs) are in the wheelhouse only after `python -m tools.docker_bases --gpu`: what is
# missing there comes from the index.
RUN version="$(sed -n 's/^tensorflow-cpu==//p' /requirements/model.txt)" \
    && sed '/^tensorflow-cpu==/d' /requirements/model.txt > /requirements/gpu.txt \
    && echo "tensorflow[and-cuda]==$version" >> /requirements/gpu.txt \
    && ALSO_FROM_INDEX=1 venv-install -r /requirements/gpu.txt \
    && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include

FROM app AS gpu
COPY --from=deps-gpu /opt/venv /opt/venv
COPY shared shared
COPY worker worker
COPY models models
RUN python -m compileall -q /app
USER app
CMD ["python", "-m", "worker", "--queues", "predict", "--concurrency", "1"]
