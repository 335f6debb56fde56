# syntax=docker/dockerfile:1
#
# diracnet, CPU build: a small Debian-slim image, no CUDA. Build from the repository root:
#
#   docker build -f docker/cpu.Dockerfile -t diracnet:cpu .
#   docker run -p 8080:8080 -v diracnet-cache:/data diracnet:cpu
#
# The build is docker/build.sh (what CI runs); the build image's Debian release matches the
# runtime image's, so the binary finds the same glibc.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# ---- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build

# nasm: mozjpeg's SIMD JPEG decoder (mozjpeg-sys feature `nasm_simd` in Cargo.toml).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY models models
COPY docker/build.sh docker/build.sh

RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    docker/build.sh cpu --out /out

# ---- runtime -------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

LABEL org.opencontainers.image.title="diracnet" \
      org.opencontainers.image.description="Folded DiracNet image classifiers over HTTP (CPU build)" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# curl: for HEALTHCHECK only. Unpinned: the distribution's current security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin diracnet \
 && mkdir -p /data \
 && chown diracnet:diracnet /data

# The model registry is compiled into the binary (build.rs); no models/ needed here.
COPY --from=build /out/diracnet /usr/local/bin/diracnet

ENV DIRACNET_CACHE=/data \
    DIRACNET_HOST=0.0.0.0 \
    DIRACNET_PORT=8080 \
    DIRACNET_DEVICE=cpu

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${DIRACNET_PORT:-8080}/healthz || exit 1"]

ENTRYPOINT ["diracnet"]
CMD ["serve"]
