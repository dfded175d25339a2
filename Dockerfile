# syntax=docker/dockerfile:1
# The tandem image: one binary for every role (`tandem gateway | scheduler | decode | prefill`, or `serve`).
#
#   docker build -t tandem:0.1.0 .
#   docker run --rm -p 8000:8000 tandem:0.1.0            # `tandem serve`: every role, built-in model, embedded log
#
# Two stages: cargo builds the release binary on Debian bookworm (glibc 2.36, so the binary also runs on the newer
# glibc of the runtime stage); the runtime stage is NVIDIA's CUDA runtime image, because the CUDA backend (cudarc,
# built for CUDA 13.0 with dynamic loading) opens libcublas and libnvrtc from it at run time, and the NVIDIA
# container toolkit mounts the driver's libcuda into GPU pods. Nothing CUDA is needed to build: cudarc loads the
# libraries when a role starts with `--device cuda:N`, so the CPU roles (gateway, scheduler) run on any node.

ARG RUST_VERSION=1.95
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the crates.io downloads and the build between image builds; the binary is copied out of the
# cached target folder, which does not end up in the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tandem \
    && install -D -m 0755 target/release/tandem /out/bin/tandem \
    && mkdir -p /out/share/tandem \
    && cp -r assets/qwen3-tokenizer /out/share/tandem/qwen3-tokenizer

FROM ${CUDA_RUNTIME_IMAGE} AS runtime
# A fixed numeric uid, so Kubernetes can check `runAsNonRoot` and a PVC can be given to it with `fsGroup`.
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/tandem --shell /usr/sbin/nologin tandem \
    && mkdir -p /var/lib/tandem \
    && chown 10001:10001 /var/lib/tandem
# The binary finds the shipped Qwen3 tokenizer (for the built-in model) at ../share/tandem/qwen3-tokenizer.
COPY --from=build /out/bin/tandem /usr/local/bin/tandem
COPY --from=build /out/share/tandem /usr/local/share/tandem
ENV TANDEM_DATA_DIR=/var/lib/tandem \
    RUST_LOG=info \
    NO_COLOR=1
WORKDIR /var/lib/tandem
USER 10001:10001
# 8000: the gateway's OpenAI API; 8001/8002/8003: the scheduler's, decode's and prefill's health endpoints; 9000: the
# decode worker's KV receiver (as k8s/tandem.yaml sets it).
EXPOSE 8000 8001 8002 8003 9000
ENTRYPOINT ["/usr/local/bin/tandem"]
CMD ["serve"]
