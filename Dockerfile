# AEGIS images: one target per role, all on one shared base (Debian bookworm, Python 3.11, a venv at /opt/aegis).
#
#   train   python -m train: torch (CUDA build from PyPI) + bitsandbytes + transformers/peft/accelerate
#   export  python -m export: the train image's Python + gguf + llama-cpp-python
#   serve   python -m serve (OpenAI-compatible API, llama.cpp) and python -m serve.ui (Gradio): no torch
#   serve-cuda  the same on NVIDIA GPUs: llama.cpp compiled with CUDA, on NVIDIA's CUDA runtime image (compose.yaml)
#
#   docker build --target train -t aegis-train .        (compose.yaml builds all three; see docs/containers.md)
#
# Build arguments:
#   BASE_IMAGE          the Debian bookworm image to start from (default below, pinned by date tag); a locally built
#                       one works the same (docker/local-base.sh makes one where no registry is reachable)
#   LLAMA_CPP_PYTHON    the llama-cpp-python release to compile (the one docker/constraints.txt pins)
#   LLAMA_CMAKE_ARGS    how llama.cpp is compiled for llama-cpp-python (default: portable x86-64 with AVX2/FMA, not
#                       -march=native of the build machine)
#   SERVE_TRANSFORMERS  1: also install torch + transformers into serve, for its transformers backend (default 0)
#   TORCH_INDEX_URL     an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu for CPU-only
#                       images (default: none, so PyPI's CUDA build)
#   CUDA_DEVEL_IMAGE, CUDA_RUNTIME_IMAGE   serve-cuda's build and run images (NVIDIA's, one CUDA release, one Ubuntu)
#   CUDA_ARCHITECTURES  the GPU generations serve-cuda's llama.cpp is compiled for (default: Turing to Hopper, the
#                       RTX 3060 included)
# Local wheels: wheel files in docker/wheels/ (git-ignored) are preferred to PyPI's of the same release. A CPU-only
# torch wheel there (torch-2.13.0+cpu-...whl) makes CPU images without the multi-GB CUDA build; nothing there (the
# default) means torch's CUDA build from PyPI.

ARG BASE_IMAGE=docker.io/library/debian:bookworm-20250520-slim
ARG CUDA_DEVEL_IMAGE=docker.io/nvidia/cuda:12.8.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- base: Python, a venv, the user, the data directories ------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
# Package versions come with the pinned base image's Debian release; pinning each one would break at every
# Debian point release, which removes the old versions from the mirrors.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/aegis \
    && groupadd --gid 1000 aegis \
    && useradd --uid 1000 --gid aegis --create-home --shell /usr/sbin/nologin aegis \
    && mkdir -p /data/runs /cache/huggingface /cache/aegis \
    && chown -R aegis:aegis /data /cache
ENV PATH=/opt/aegis/bin:$PATH \
    VIRTUAL_ENV=/opt/aegis \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HOME=/cache/huggingface \
    AEGIS_CACHE=/cache/aegis \
    AEGIS_RUNS=/data/runs
WORKDIR /app

# ---- builders: nothing of these stages reaches an image but what is copied out of them -------------------------
# llama-cpp-python's wheel, compiled once, copied into export and serve. It depends on nothing but the base, its
# version and the CMake options, so the slow compile stays cached while everything else changes.
FROM base AS llama-build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ARG LLAMA_CPP_PYTHON=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
# A wheel of this release in docker/wheels/ is taken as it is, without compiling. No pip cache: pip would reuse a
# wheel it built with other LLAMA_CMAKE_ARGS.
COPY docker/wheels/.gitignore docker/wheels/llama_cpp_python-* /tmp/wheels/
RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip wheel --no-cache-dir --no-deps --find-links /tmp/wheels \
        --wheel-dir /llama "llama-cpp-python==$LLAMA_CPP_PYTHON"

# what the dependency installs read: pyproject.toml's requirements, the pins, local wheels
FROM base AS deps
COPY pyproject.toml docker/requirements.py docker/constraints.txt /app/deps/
COPY docker/wheels/ /tmp/wheels/

# the project's own wheel (its source only; third-party packages are installed per role, below)
FROM base AS package
COPY pyproject.toml /src/
COPY aegis/ /src/aegis/
COPY train/ /src/train/
COPY export/ /src/export/
COPY serve/ /src/serve/
RUN --mount=type=cache,target=/root/.cache/pip pip wheel --no-deps --wheel-dir /pkg /src

# third-party packages per role, in the venv (these layers stay cached while pyproject.toml and the pins are unchanged)
FROM deps AS train-venv
ARG TORCH_INDEX_URL=""
RUN --mount=type=cache,target=/root/.cache/pip \
    python /app/deps/requirements.py /app/deps/pyproject.toml train >/tmp/train.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} --find-links /tmp/wheels \
        -c /app/deps/constraints.txt -r /tmp/train.txt

FROM deps AS serve-venv
ARG SERVE_TRANSFORMERS=0
ARG TORCH_INDEX_URL=""
COPY --from=llama-build /llama/ /tmp/llama/
RUN --mount=type=cache,target=/root/.cache/pip \
    set -- serve && if [ "$SERVE_TRANSFORMERS" = 1 ]; then set -- serve train; fi \
    && python /app/deps/requirements.py /app/deps/pyproject.toml "$@" >/tmp/serve.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} --only-binary llama-cpp-python \
        --find-links /tmp/llama --find-links /tmp/wheels -c /app/deps/constraints.txt -r /tmp/serve.txt

FROM base AS train-runtime
COPY --from=train-venv /opt/aegis/ /opt/aegis/

# ---- the role images ---------------------------------------------------------------------------------------------
FROM train-runtime AS train
COPY --from=package /pkg/ /tmp/pkg/
RUN pip install --no-cache-dir --no-deps /tmp/pkg/*.whl && rm -rf /tmp/pkg
COPY configs/ /app/configs/
COPY docker/train-entrypoint.sh /app/docker/
USER 1000:1000
ENTRYPOINT ["bash", "/app/docker/train-entrypoint.sh"]

# export: the train image's packages (shared layers) + gguf + llama-cpp-python
FROM train-runtime AS export
COPY --from=llama-build /llama/ /tmp/llama/
COPY pyproject.toml docker/requirements.py docker/constraints.txt /tmp/deps/
RUN python /tmp/deps/requirements.py /tmp/deps/pyproject.toml export >/tmp/export.txt \
    && pip install --no-cache-dir --only-binary llama-cpp-python --find-links /tmp/llama \
        -c /tmp/deps/constraints.txt -r /tmp/export.txt \
    && rm -rf /tmp/llama /tmp/deps /tmp/export.txt
COPY --from=package /pkg/ /tmp/pkg/
RUN pip install --no-cache-dir --no-deps /tmp/pkg/*.whl && rm -rf /tmp/pkg
COPY configs/ /app/configs/
COPY docker/export-entrypoint.sh /app/docker/
USER 1000:1000
ENTRYPOINT ["bash", "/app/docker/export-entrypoint.sh"]

# serve: the API and the chat UI (compose runs both from this image)
FROM base AS serve
COPY --from=serve-venv /opt/aegis/ /opt/aegis/
COPY --from=package /pkg/ /tmp/pkg/
RUN pip install --no-cache-dir --no-deps /tmp/pkg/*.whl && rm -rf /tmp/pkg
COPY docker/serve-entrypoint.sh docker/healthcheck.py /app/docker/
USER 1000:1000
ENV AEGIS_PORT=8000
EXPOSE 8000 7860
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["bash", "/app/docker/serve-entrypoint.sh"]

# ---- serve-cuda: the API on NVIDIA GPUs ---------------------------------------------------------------------------
# llama-cpp-python compiled with CUDA on NVIDIA's devel image, installed on its runtime image (same Ubuntu, so the same
# Python); `python -m serve` puts every layer on the GPU unless --n-gpu-layers says otherwise. The CPU images above
# stay as they are.
FROM ${CUDA_DEVEL_IMAGE} AS llama-build-cuda
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/build
ARG LLAMA_CPP_PYTHON=0.3.36
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
# the driver's libcuda is there only at run time: link against the toolkit's stub
RUN CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES" \
        LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
        /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /llama "llama-cpp-python==$LLAMA_CPP_PYTHON"

FROM ${CUDA_RUNTIME_IMAGE} AS serve-cuda
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/aegis \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 aegis \
    && useradd --uid 1000 --gid aegis --create-home --shell /usr/sbin/nologin aegis \
    && mkdir -p /data/runs \
    && chown -R aegis:aegis /data
ENV PATH=/opt/aegis/bin:$PATH \
    VIRTUAL_ENV=/opt/aegis \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    AEGIS_RUNS=/data/runs \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
COPY pyproject.toml docker/requirements.py docker/constraints.txt /app/deps/
COPY --from=llama-build-cuda /llama/ /tmp/llama/
COPY --from=package /pkg/ /tmp/pkg/
RUN python /app/deps/requirements.py /app/deps/pyproject.toml serve >/tmp/serve.txt \
    && pip install --no-cache-dir --only-binary llama-cpp-python --find-links /tmp/llama \
        -c /app/deps/constraints.txt -r /tmp/serve.txt \
    && pip install --no-cache-dir --no-deps /tmp/pkg/*.whl \
    && rm -rf /tmp/llama /tmp/pkg /tmp/serve.txt
COPY docker/serve-entrypoint.sh docker/healthcheck.py /app/docker/
USER 1000:1000
ENV AEGIS_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["bash", "/app/docker/serve-entrypoint.sh"]
