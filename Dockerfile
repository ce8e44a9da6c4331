# syntax=docker/dockerfile:1
#
# wkr-serving in one image: the server (wkr-serving-start, with its HTTP bridge), the
# decentralized pool (wkr-decentral-start, with the Redis job queue) and the scikit-learn
# iris example (example/iris) that the image serves by default.
#
#   docker build -t wkr-serving:local .
#   docker volume create wkr-models
#   docker run --rm -v wkr-models:/models --entrypoint python wkr-serving:local \
#       example/iris/train.py --out /models
#   docker run --rm -v wkr-models:/models:ro -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#       wkr-serving:local
#
# deploy/README.rst has the whole story (compose, Kubernetes); tests/test_deploy_files.py
# lints this file with hadolint and runs its HEALTHCHECK and its ENTRYPOINT + CMD for real.
FROM python:3.11.13-slim-bookworm

# tini runs as PID 1: it hands SIGTERM to wkr-serving-start (which then drains for up to
# -graceful_timeout seconds) and reaps any orphaned process.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package from this repository (a local path: its version is the checkout's, its
# dependencies are pyproject.toml's), with the pool's extra (redis), and what the iris
# example needs, pinned (scikit-learn, skops: the model is saved as .skops, not a pickle).
WORKDIR /src
COPY pyproject.toml README.rst ./
COPY client/ client/
COPY server/ server/
RUN pip install --no-cache-dir "./[pool]" scikit-learn==1.9.1 skops==0.16.0

# An unprivileged user (numeric, so Kubernetes' runAsNonRoot can check it). It owns only
# /models, the model volume (a fresh named volume mounted there takes this ownership, so
# the training step can write into it); the code stays root's and read-only.
RUN groupadd --system --gid 10001 wkr \
    && useradd --system --no-log-init --uid 10001 --gid wkr --home-dir /app \
        --shell /usr/sbin/nologin wkr \
    && mkdir /models \
    && chown wkr:wkr /models

# The working directory mirrors the repository root, so worker classes are named as in
# the docs: example/iris/worker.Worker is /app/example/iris/worker.py.
WORKDIR /app
COPY example/ example/
USER 10001:10001
VOLUME ["/models"]

# 5555/5556: the server's ZeroMQ ports (requests, results); 8080: its HTTP bridge;
# 8901: the pool's HTTP port (/health, /metrics) when the image runs wkr-decentral-start.
EXPOSE 5555 5556 8080 8901

# Ready = every worker has loaded the model and the pipeline answers (a 503 fails it).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/ready', timeout=4)"]

# A stop gives the server -graceful_timeout (20 s) to finish its work: give the container
# more than that (docker run --stop-timeout 30, compose's stop_grace_period: 30s,
# Kubernetes' terminationGracePeriodSeconds: 30), or it is killed mid-drain.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "wkr-serving-start"]
CMD ["example/iris/worker.Worker", "-model_dir", "/models", "-model_name", "iris.skops", \
     "-protocol", "obj", "-port", "5555", "-port_out", "5556", "-http_port", "8080", \
     "-num_worker", "2", "-graceful_timeout", "20", "-log_format", "json"]
