# One image for every role (web, worker, fetcher, flower); the command picks the role.
# The `gpu` target swaps TensorFlow's CPU build for the CUDA one (same version).
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STORAGE_DIR=/data/images MODEL_DIR=/app/models/cifar10-airbench
WORKDIR /app
COPY requirements requirements
RUN pip install -r requirements/model.txt
COPY shared ./shared
COPY web ./web
COPY worker ./worker
COPY training ./training
COPY tools ./tools
COPY models ./models
RUN useradd --create-home --uid 10001 app && mkdir -p /data/images && chown -R app /data
USER app
EXPOSE 8000
CMD ["gunicorn", "-c", "python:web.gunicorn_conf", "-b", "0.0.0.0:8000", "-w", "2", "-k", "gthread", "--threads", "16", "web.wsgi:app"]

FROM base AS gpu
USER root
RUN pip uninstall -y tensorflow-cpu && \
    pip install "tensorflow[and-cuda]==$(sed -n 's/^tensorflow-cpu==//p' requirements/model.txt)"
USER app
