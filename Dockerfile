# syntax=docker/dockerfile:1
#
# VirNucPro batch image: CUDA 12.8 runtime, Python 3.11, torch 2.11 (cu128 wheels: the version the GPU engine was measured on) and the
# project in /opt/venv, `virnucpro` run by entrypoint.sh under tini, as a non-root user.
#
#   docker build -t virnucpro .                                    # default: no weights
#   docker build --target flash-attn -t virnucpro:fa .             # + flash-attn (slow build)
#   docker build --target with-models -t virnucpro:models .        # + weights from ./models
#   docker build --target flash-attn-with-models -t virnucpro:fa-models .
#
# Portable: Docker (BuildKit), buildah and podman all build it; a target is chosen with
# --target, never by a stage name taken from an argument. Builders skip the stages the target
# does not use (BuildKit always, buildah/podman by default), so the flash-attn stages and their
# devel base are fetched only for the flash-attn targets.
# Layers run from least to most often changed: OS packages, torch, the other dependencies
# (keyed on pyproject.toml alone), then the project's source.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=22.04
# The base of every stage but the flash-attn compiler. Any Debian or Ubuntu image with
# python3.11 and tini packages works (CI builds on a debootstrapped Debian 12 without CUDA);
# the GPU image needs the CUDA runtime one.
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
ARG DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}

# ---- python: Python 3.11 and tini on the CUDA runtime; base of the build and final image.
# The torch wheels bring their own cuDNN/cuBLAS; the base image brings the NVIDIA container
# settings and the user-space libraries that match the host driver's CUDA 12 interface.
# gcc and the Python headers are for Triton, which compiles its kernel launchers at run
# time: without them the FlexAttention backend (core/attention.py) is unavailable.
# (Variable base: BASE_IMAGE above carries the tag.)
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
# The distribution's own package versions move with security updates: pinning them breaks
# rebuilds. The package names are the same on Ubuntu 22.04 and Debian 12.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3.11 python3.11-dev python3.11-venv tini \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- deps: the virtual environment with torch and every dependency, not the project yet.
FROM python AS deps
# TORCH_VERSION/TORCH_INDEX_URL pick the wheel: CI builds with a CPU wheel
# (TORCH_VERSION=2.13.0+cpu, the index of its choice).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The distribution's venv seeds an old pip. s3fs pins aiobotocore, which pins botocore, which
# boto3 must match: pip 26.3 resolves that in seconds, pip 25.0 backtracked for many minutes.
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==26.3
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Dependencies are read out of pyproject.toml, so editing the source does not redo this
# layer; the constraint keeps pip from swapping the chosen torch for a PyPI build.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c 'import tomllib; print(*tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt

# ---- build: the project itself on top of the environment.
FROM deps AS build
COPY pyproject.toml README.md /src/
COPY core/ /src/core/
COPY job/ /src/job/
RUN pip install --no-cache-dir --no-deps /src && pip check

# ---- flash-attn-build: compiles flash-attn into the same environment on the CUDA devel image.
# Expect roughly 30-60+ minutes. MAX_JOBS bounds the parallel nvcc jobs (each can take 4-8 GB
# of RAM: keep MAX_JOBS <= RAM in GB / 8); FLASH_ATTN_CUDA_ARCHS picks the GPU generations
# (80 also runs on A10G/L4, sm86/sm89; 90 is H100). No GPU is needed to build.
#   docker build --target flash-attn --build-arg MAX_JOBS=8 -t virnucpro:fa .
# hadolint ignore=DL3006
FROM ${DEVEL_IMAGE} AS flash-attn-build
ARG DEBIAN_FRONTEND=noninteractive
ARG FLASH_ATTN_VERSION=2.7.4.post1
ARG MAX_JOBS=4
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Build tools pinned to versions flash-attn 2.7's setup.py works with (it still imports
# wheel.bdist_wheel). FORCE_BUILD: compile here, not fetch a prebuilt wheel matched by guesswork.
RUN pip install ninja==1.11.1.4 packaging==24.2 psutil==7.0.0 setuptools==75.8.0 wheel==0.45.1 \
    && MAX_JOBS="${MAX_JOBS}" FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" \
       FLASH_ATTENTION_FORCE_BUILD=TRUE \
       pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
    && python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"

# ---- image: what every runtime target shares (user, entrypoint), without the environment.
FROM python AS image
# A fixed UID so volume permissions and Kubernetes runAsUser can name it. HOME is
# world-writable (sticky, like /tmp) so `docker run --user "$(id -u):$(id -g)"` can still
# keep caches there (~/.cache/virnucpro/models is the default model cache).
RUN groupadd --gid 10001 virnucpro \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/virnucpro \
        --shell /usr/sbin/nologin virnucpro \
    && chmod 1777 /home/virnucpro
COPY --chmod=0755 entrypoint.sh /app/entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/virnucpro
USER 10001:10001
WORKDIR /home/virnucpro
# tini is PID 1: it forwards SIGTERM to the job (which entrypoint.sh exec's into), reaps
# any orphaned children and exits with the job's exit code.
ENTRYPOINT ["tini", "--", "/app/entrypoint.sh"]

# ---- flash-attn (optional target): the runtime image with flash-attn compiled in.
FROM image AS flash-attn
COPY --from=flash-attn-build /opt/venv /opt/venv

# ---- runtime: the image that runs the job (the default target, see the last stage).
FROM image AS runtime
COPY --from=build /opt/venv /opt/venv

# ---- with-models / flash-attn-with-models (optional targets): the weights baked in, so
# the job downloads nothing at start. Put the files under ./models (git-ignored,
# world-readable: `chmod -R a+rX models`) and name them if they differ from the defaults:
#   models/esm2_t36_3B_UR50D.pt
#   models/DNABERT-S/            (config.json, tokenizer.json, weights)
#   models/500_model.pth         (or 300_model.pth / a converted .safetensors: set CLASSIFIER)
#   docker build --target with-models --build-arg CLASSIFIER=300_model.pth -t virnucpro:models .
# The variables set here are defaults: a job can still point any of them elsewhere.
FROM runtime AS with-models
ARG ESM_MODEL=esm2_t36_3B_UR50D.pt
ARG DNABERT_MODEL=DNABERT-S
ARG CLASSIFIER=500_model.pth
COPY models/ /opt/models/
ENV ESM_MODEL_URI=/opt/models/${ESM_MODEL} \
    DNABERT_MODEL_URI=/opt/models/${DNABERT_MODEL} \
    CLASSIFIER_URI=/opt/models/${CLASSIFIER}

FROM flash-attn AS flash-attn-with-models
ARG ESM_MODEL=esm2_t36_3B_UR50D.pt
ARG DNABERT_MODEL=DNABERT-S
ARG CLASSIFIER=500_model.pth
COPY models/ /opt/models/
ENV ESM_MODEL_URI=/opt/models/${ESM_MODEL} \
    DNABERT_MODEL_URI=/opt/models/${DNABERT_MODEL} \
    CLASSIFIER_URI=/opt/models/${CLASSIFIER}

# ---- default target (last stage): the runtime image, without weights.
FROM runtime
