# syntax=docker/dockerfile:1
#
# Static, non-root image of the `sluice` binary (every subcommand: operator, authz, policy, crd, ...).
#   docker build -t sluice:dev .
#   docker run --rm sluice:dev crd

ARG RUST_VERSION=1.95

# ---- build: a static musl binary -------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder

ARG TARGET=x86_64-unknown-linux-musl
# musl-gcc compiles the C parts of dependencies (ring) for the musl target.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "${TARGET}"
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TERM_COLOR=never

WORKDIR /src

# 1. Dependencies only: manifests plus empty stub sources, so this layer is rebuilt only when
#    Cargo.toml/Cargo.lock change, not on every source edit. A new workspace member, or a target declared
#    with an explicit path ([[bench]], [[test]], ...), needs its manifest and stub added here.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY vendor vendor
COPY operator/Cargo.toml operator/
COPY e2e/Cargo.toml e2e/
COPY xtask/Cargo.toml xtask/
RUN mkdir -p operator/src e2e/src xtask/src \
    && echo 'fn main() {}' > operator/src/main.rs && touch operator/src/lib.rs \
    && echo 'fn main() {}' > e2e/src/main.rs && touch e2e/src/lib.rs \
    && echo 'fn main() {}' > xtask/src/main.rs \
    && cargo build --release --locked --target "${TARGET}" -p sluice \
    && rm -rf operator/src e2e/src xtask/src

# 2. The real sources. Only the `sluice` crate is built; the other members just need to parse.
COPY operator operator
COPY e2e e2e
COPY xtask xtask
# Make sure cargo sees the sources as newer than the stub build.
RUN touch operator/src/main.rs operator/src/lib.rs \
    && cargo build --release --locked --target "${TARGET}" -p sluice \
    && cp "target/${TARGET}/release/sluice" /sluice \
    && /sluice --version

# ---- runtime: distroless static, nonroot ------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Progressive delivery and authorization operator for service meshes" \
      org.opencontainers.image.source="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.url="https://github.com/sluice-dev/sluice" \
      org.opencontainers.image.documentation="https://github.com/sluice-dev/sluice/blob/main/docs/install.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=builder /sluice /sluice
USER 65532:65532
# 8080: metrics and health probes, 8181: OPA bundle server (see config/base).
EXPOSE 8080 8181
ENTRYPOINT ["/sluice"]
CMD ["--help"]
