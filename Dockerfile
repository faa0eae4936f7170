# AlignSAM ML backend image: the web process (gunicorn) and the workers (alignsam-worker) share it.
# Real weights are fetched at build time: SAM ViT-B and OpenAI CLIP ViT-B/16 (through open_clip's own loader).
#   docker build -t alignsam-ls .
#   docker compose -f deploy/docker-compose.yml up
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/opt/hf \
    MODEL_DIR=/data \
    SAM_PRESET=vit_b \
    SAM_CHECKPOINT=/opt/weights/sam_vit_b_01ec64.pth \
    CLIP_PRESET=vit_b16 \
    CLIP_PRETRAINED=openai \
    PORT=9090

RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY alignsam ./alignsam
COPY ml_backend ./ml_backend
COPY workers ./workers
RUN pip install .

# SAM ViT-B checkpoint (375 MB) from Meta's release, checked by size; CLIP ViT-B/16 OpenAI weights through the
# same loading code the workers use (ClipSurgery.from_preset), so the build fails if they cannot be loaded.
RUN mkdir -p /opt/weights \
    && curl -fL --retry 3 -o /opt/weights/sam_vit_b_01ec64.pth \
       https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth \
    && test "$(stat -c %s /opt/weights/sam_vit_b_01ec64.pth)" -gt 300000000 \
    && python -c "from alignsam.clip_surgery import ClipSurgery; ClipSurgery.from_preset('vit_b16', pretrained='openai')" \
    && python -c "from alignsam.sam import FrozenSam; FrozenSam.from_preset('vit_b', checkpoint='/opt/weights/sam_vit_b_01ec64.pth')"

# Offline from here on: the weights are in the image.
ENV HF_HUB_OFFLINE=1
VOLUME ["/data"]
EXPOSE 9090
# The web process; workers override the command with `alignsam-worker --queues ...`.
CMD ["gunicorn", "-c", "python:ml_backend.gunicorn_conf", "ml_backend.wsgi:app"]
