# syntax=docker/dockerfile:1
#
# diracnet, CUDA build (GPU image). The CPU image is docker/cpu.Dockerfile.
#
#   docker build -t diracnet .
#   docker run --gpus all -p 8080:8080 -v diracnet-cache:/data diracnet
#   docker run            -p 8080:8080 -v diracnet-cache:/data diracnet   # no GPU: serves on the CPU
#
# Build arguments:
#   CUDA_VERSION      NVIDIA base image version (devel for the build, runtime for the image).
#                     13.0.x needs a host driver >= 580. For older drivers build with a 12.x
#                     image, e.g. --build-arg CUDA_VERSION=12.9.1 (driver >= 575); the devel and
#                     runtime images always match.
#   CUDA_COMPUTE_CAP  80 (default): candle's kernels as PTX for compute capability 8.0, which the
#                     driver JIT-compiles once for 8.0, 8.6, 8.7, 8.9, 9.0 and newer GPUs (A100,
#                     A10/RTX 30xx, L4/L40/RTX 40xx, H100/H200, B200, RTX 50xx); the result is
#                     cached under /data/cuda-cache. cuBLAS and cuDNN, which do the heavy work, ship
#                     native code for every one of these. For a build tuned to one GPU, pass its
#                     capability: 86, 89, 90 (sm_90a: Hopper only), 100, 120. 75 for Turing (T4).
#   RUST_VERSION      the Rust toolchain (rustup); keep in step with CI's.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---- build ---------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS build

ARG RUST_VERSION=1.95.0
ARG CUDA_COMPUTE_CAP=80

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}

# nasm: mozjpeg's SIMD JPEG decoder (mozjpeg-sys feature `nasm_simd` in Cargo.toml).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl nasm \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version && nvcc --version

WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY models models
COPY docker/build.sh docker/build.sh

# The same script CI runs (docker/build.sh). The target directory is a cache mount, so the
# binary is copied out to /out in this same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP}" docker/build.sh cuda --out /out \
 && mkdir -p /out/stubs \
 && cp /usr/local/cuda/lib64/stubs/libcuda.so /out/stubs/libcuda.so.1

# ---- runtime -------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS runtime

ARG CUDA_COMPUTE_CAP=80
LABEL org.opencontainers.image.title="diracnet" \
      org.opencontainers.image.description="Folded DiracNet image classifiers over HTTP (CUDA build)" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      io.diracnet.cuda-compute-cap="${CUDA_COMPUTE_CAP}"

# curl: for HEALTHCHECK only. Unpinned: the distribution's current security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin diracnet \
 && mkdir -p /data \
 && chown diracnet:diracnet /data

# The model registry (models/*.toml, imagenet_classes.txt) is compiled into the binary by
# build.rs; the image needs no copy of models/.
COPY --from=build /out/diracnet /usr/local/libexec/diracnet/diracnet
COPY --from=build /out/stubs/libcuda.so.1 /usr/local/lib/diracnet/stubs/libcuda.so.1
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/diracnet

# DIRACNET_DEVICE=auto: the GPU when `--gpus` gives one, else the CPU; the log line `device`
# says which. The numeric type follows the device (f16 on the GPU, f32 on the CPU) unless
# DIRACNET_DTYPE says otherwise.
ENV DIRACNET_CACHE=/data \
    DIRACNET_HOST=0.0.0.0 \
    DIRACNET_PORT=8080 \
    DIRACNET_DEVICE=auto \
    CUDA_CACHE_PATH=/data/cuda-cache \
    CUDA_CACHE_MAXSIZE=1073741824

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# Liveness: /healthz answers 200 as soon as the server listens, before the models are loaded
# (readiness is /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${DIRACNET_PORT:-8080}/healthz || exit 1"]

ENTRYPOINT ["diracnet"]
CMD ["serve"]
