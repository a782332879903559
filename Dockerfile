# AEGIS images: one target per role, all on one shared base stage (a venv at /opt/aegis, the user aegis, uid 1000).
#
#   train   python -m train: torch (CUDA build from PyPI) + bitsandbytes + transformers/peft/accelerate
#   export  python -m export: the train image's Python + gguf + llama-cpp-python
#   serve   python -m serve (OpenAI-compatible API, llama.cpp) and python -m serve.ui (Gradio): no torch
#
#   docker build --target train -t aegis-train .        (compose.yaml builds all three; see docs/containers.md)
#
# The base is Debian bookworm (Python 3.11) by default. The same stages build on NVIDIA's CUDA images (Ubuntu 24.04,
# Python 3.12): compose.yaml's GPU `serve` is the serve target built with
#   --build-arg BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04
#   --build-arg LLAMA_BUILD_IMAGE=docker.io/nvidia/cuda:12.8.1-devel-ubuntu24.04
#   --build-arg LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=75;80;86;89;90"
#
# Build arguments:
#   BASE_IMAGE          the image every role image starts from (default below: Debian bookworm, pinned by date tag);
#                       a locally built one works the same (docker/local-base.sh makes one where no registry is
#                       reachable); for the GPU serve image NVIDIA's CUDA runtime image
#   LLAMA_BUILD_IMAGE   the image llama-cpp-python is compiled on (default: the base stage); for a CUDA build NVIDIA's
#                       devel image of the runtime image's CUDA release and Ubuntu, so that the compiled llama.cpp
#                       finds the same glibc and CUDA libraries where it is installed
#   LLAMA_CPP_PYTHON    the llama-cpp-python release to compile (the one requirements.lock pins)
#   LLAMA_CMAKE_ARGS    how llama.cpp is compiled for llama-cpp-python (default: portable x86-64 with AVX2/FMA, not
#                       -march=native of the build machine; with -DGGML_CUDA=on and the GPU generations, for CUDA)
#   SERVE_TRANSFORMERS  1: also install torch + transformers into serve, for its transformers backend (default 0)
#   TORCH_INDEX_URL     an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu for CPU-only
#                       images (default: none, so PyPI's CUDA build)
# Local wheels: wheel files in docker/wheels/ (git-ignored) are preferred to PyPI's of the same release. A CPU-only
# torch wheel there (torch-2.13.0+cpu-...whl) makes CPU images without the multi-GB CUDA build; nothing there (the
# default) means torch's CUDA build from PyPI. A llama-cpp-python wheel there is taken instead of the compile, CUDA
# build or not: keep only the one that matches the image being built.

ARG BASE_IMAGE=docker.io/library/debian:bookworm-20250520-slim
# an earlier stage's name works here as an image's does
ARG LLAMA_BUILD_IMAGE=base

# ---- base: Python, a venv, the user, the data directories ------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
# Package versions come with the pinned base image's release; pinning each one would break at every Debian point
# release, which removes the old versions from the mirrors. The package names exist on Debian bookworm and Ubuntu
# 24.04 alike, and the venv's paths name no Python version. A user or group that holds uid/gid 1000 on the base image
# (NVIDIA's Ubuntu images have `ubuntu`) makes way for aegis.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/aegis \
    && for u in $(id -nu 1000 2>/dev/null); do userdel "$u" && rm -rf "/home/${u:?}"; done \
    && for g in $(getent group 1000); do groupdel "${g%%:*}"; done \
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
# llama-cpp-python's wheel, compiled once, copied into export and serve. It depends on nothing but the build image,
# the release and the CMake options, so the slow compile stays cached while everything else changes. The build image
# is the base stage (CPU), or NVIDIA's CUDA devel image for the GPU serve image; a venv of its own, as that image has
# no /opt/aegis.
FROM ${LLAMA_BUILD_IMAGE} AS llama-build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/build
ARG LLAMA_CPP_PYTHON=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
# A wheel of this release in docker/wheels/ is taken as it is, without compiling. No pip cache: pip would reuse a
# wheel it built with other LLAMA_CMAKE_ARGS. LIBRARY_PATH: with CUDA, the driver's libcuda is there only at run time,
# so the link takes the toolkit's stub (the folder does not exist on the CPU build image).
COPY docker/wheels/.gitignore docker/wheels/llama_cpp_python-* /tmp/wheels/
RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
        /opt/build/bin/pip wheel --no-cache-dir --no-deps --find-links /tmp/wheels \
        --wheel-dir /llama "llama-cpp-python==$LLAMA_CPP_PYTHON"

# what the dependency installs read: pyproject.toml's requirements, the pins (requirements.lock, the releases CI
# tests), local wheels
FROM base AS deps
COPY pyproject.toml requirements.lock docker/requirements.py /app/deps/
COPY docker/wheels/ /tmp/wheels/

# the project's own wheel (its source only; third-party packages are installed per role, below)
FROM base AS package
COPY pyproject.toml LICENSE /src/
COPY aegis/ /src/aegis/
COPY train/ /src/train/
COPY export/ /src/export/
COPY serve/ /src/serve/
RUN --mount=type=cache,target=/root/.cache/pip pip wheel --no-deps --wheel-dir /pkg /src

# what every role image adds on top of its packages: the project's wheel, the configs, the entrypoints
FROM scratch AS app
COPY --from=package /pkg/ /app/pkg/
COPY configs/ /app/configs/
COPY docker/train-entrypoint.sh docker/export-entrypoint.sh docker/serve-entrypoint.sh docker/healthcheck.py \
    /app/docker/

# third-party packages per role, in the venv (these layers stay cached while pyproject.toml and the lock are unchanged)
FROM deps AS train-venv
ARG TORCH_INDEX_URL=""
RUN --mount=type=cache,target=/root/.cache/pip \
    python /app/deps/requirements.py /app/deps/pyproject.toml train >/tmp/train.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} --find-links /tmp/wheels \
        -c /app/deps/requirements.lock -r /tmp/train.txt

FROM deps AS serve-venv
ARG SERVE_TRANSFORMERS=0
ARG TORCH_INDEX_URL=""
COPY --from=llama-build /llama/ /tmp/llama/
RUN --mount=type=cache,target=/root/.cache/pip \
    set -- serve && if [ "$SERVE_TRANSFORMERS" = 1 ]; then set -- serve train; fi \
    && python /app/deps/requirements.py /app/deps/pyproject.toml "$@" >/tmp/serve.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} --only-binary llama-cpp-python \
        --find-links /tmp/llama --find-links /tmp/wheels -c /app/deps/requirements.lock -r /tmp/serve.txt

FROM base AS train-runtime
COPY --from=train-venv /opt/aegis/ /opt/aegis/

# ---- the role images ---------------------------------------------------------------------------------------------
FROM train-runtime AS train
COPY --from=app /app/ /app/
RUN pip install --no-cache-dir --no-deps /app/pkg/*.whl && rm -rf /app/pkg
USER 1000:1000
ENTRYPOINT ["bash", "/app/docker/train-entrypoint.sh"]

# export: the train image's packages (shared layers) + gguf + llama-cpp-python
FROM train-runtime AS export
COPY --from=llama-build /llama/ /tmp/llama/
COPY pyproject.toml requirements.lock docker/requirements.py /tmp/deps/
RUN python /tmp/deps/requirements.py /tmp/deps/pyproject.toml export >/tmp/export.txt \
    && pip install --no-cache-dir --only-binary llama-cpp-python --find-links /tmp/llama \
        -c /tmp/deps/requirements.lock -r /tmp/export.txt \
    && rm -rf /tmp/llama /tmp/deps /tmp/export.txt
COPY --from=app /app/ /app/
RUN pip install --no-cache-dir --no-deps /app/pkg/*.whl && rm -rf /app/pkg
USER 1000:1000
ENTRYPOINT ["bash", "/app/docker/export-entrypoint.sh"]

# serve: the API and the chat UI (compose runs both from this image). Built on NVIDIA's CUDA runtime image with the
# CUDA llama-cpp-python (build arguments above), `python -m serve` puts every layer on the GPU unless --n-gpu-layers
# says otherwise; the NVIDIA images set NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES themselves.
FROM base AS serve
COPY --from=serve-venv /opt/aegis/ /opt/aegis/
COPY --from=app /app/ /app/
RUN pip install --no-cache-dir --no-deps /app/pkg/*.whl && rm -rf /app/pkg
USER 1000:1000
ENV AEGIS_PORT=8000
EXPOSE 8000 7860
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["bash", "/app/docker/serve-entrypoint.sh"]
