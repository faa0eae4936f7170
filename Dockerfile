# syntax=docker/dockerfile:1
# AlignSAM ML backend: one image for every process; the command chooses it (deploy/docker/entrypoint.py):
#   docker run ... alignsam-ls backend                          # web process on :9090 (gunicorn, no GPU)
#   docker run --gpus all ... alignsam-ls worker --queues predict,prelabel
#   docker run --gpus all ... alignsam-ls worker --queues train
#
# Build (BuildKit): docker build -t alignsam-ls .            SAM ViT-B + CLIP ViT-B/16 inside (~7.5 GB)
#                   docker build --build-arg SAM_PRESET=vit_h -t alignsam-ls:vit_h .
#                   docker build --target slim -t alignsam-ls:slim .   no weights: mount them at /opt/weights
#
# Stages: build (a venv with the project and its pinned dependencies; torch's PyPI wheels bring their own CUDA
# runtime, so the host needs only the NVIDIA driver and container toolkit) -> slim (that venv on a bare Python,
# non-root, no compilers) -> weights (SAM and CLIP downloaded and checked against their SHA-256) -> runtime (slim +
# weights, loaded once through the workers' own loading code as the build's last step). dashboard: rq-dashboard.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the project and its dependencies in /opt/venv ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (the layer survives source edits): the exact list of pyproject.toml's [project].dependencies.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY alignsam ./alignsam
COPY ml_backend ./ml_backend
COPY workers ./workers
# Installed and importable (ml_backend.app, not .wsgi: importing wsgi builds the app, which would start Redis).
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import alignsam, ml_backend.app, ml_backend.gunicorn_conf, workers.worker" \
    && alignsam-worker --help > /dev/null

# ---- slim: the runtime without weights (mount SAM/CLIP at /opt/weights, or set SAM_CHECKPOINT/CLIP_PRETRAINED) ----
FROM ${PYTHON_IMAGE} AS slim
ARG SAM_PRESET=vit_b
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/opt/hf \
    MODEL_DIR=/data \
    PORT=9090 \
    SAM_PRESET=${SAM_PRESET} \
    SAM_CHECKPOINT=/opt/weights/sam_${SAM_PRESET}.pth \
    CLIP_PRESET=vit_b16 \
    CLIP_PRETRAINED=/opt/weights/clip_vit_b16_openai.safetensors \
    DEVICE=auto
RUN groupadd --system --gid 10001 alignsam \
    && useradd --system --uid 10001 --gid alignsam --home-dir /data --shell /usr/sbin/nologin alignsam \
    && mkdir -p /data /opt/weights /opt/hf \
    && chown alignsam:alignsam /data
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/entrypoint.py deploy/docker/fetch_weights.py /app/
WORKDIR /data
USER 10001:10001
EXPOSE 9090
VOLUME ["/data"]
# The backend's liveness (always 200 while it serves; Redis trouble is reported in the body). Compose and Kubernetes
# replace it for the workers, which serve no HTTP.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/entrypoint.py", "health"]
ENTRYPOINT ["python", "/app/entrypoint.py"]
CMD ["backend"]

# ---- weights: fetched at build time, each checked against its SHA-256 before it is kept -------------------------
FROM ${PYTHON_IMAGE} AS weights
# SAM_SHA256 / CLIP_SHA256: empty = the values in fetch_weights.py (SAM) / the hub's record for CLIP_REVISION (CLIP,
# printed in the build log so that it can be pinned).
ARG SAM_PRESET=vit_b
ARG SAM_URL=""
ARG SAM_SHA256=""
ARG CLIP_REVISION=main
ARG CLIP_SHA256=""
COPY deploy/docker/fetch_weights.py /usr/local/bin/fetch_weights.py
RUN python /usr/local/bin/fetch_weights.py sam "${SAM_PRESET}" --out "/opt/weights/sam_${SAM_PRESET}.pth" \
        --url "${SAM_URL}" --sha256 "${SAM_SHA256}" \
    && python /usr/local/bin/fetch_weights.py clip --out /opt/weights/clip_vit_b16_openai.safetensors \
        --revision "${CLIP_REVISION}" --sha256 "${CLIP_SHA256}"

# ---- dashboard: rq-dashboard (compose profile "dashboard"), with the same RQ as the workers ------------------------
FROM ${PYTHON_IMAGE} AS dashboard
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir rq-dashboard==0.9.0 six==1.17.0 rq==3.0.0 "redis>=5,<9" \
    && useradd --system --uid 10001 rqdash
USER 10001
EXPOSE 9181
# --json: the product's jobs are JSON (RQ's JSONSerializer); the default would unpickle whatever a job hash holds.
ENTRYPOINT ["rq-dashboard", "--json"]

# ---- runtime (the default target): slim + the weights, proven loadable by the workers' loading code -------------
FROM slim AS runtime
COPY --from=weights /opt/weights /opt/weights
# Loads SAM and CLIP exactly as a worker will (SAM_PRESET / SAM_CHECKPOINT / CLIP_*): a checkpoint that does not
# fit its preset fails the build here, with one line, instead of at a worker's start.
RUN DEVICE=cpu python /app/entrypoint.py check
