# syntax=docker/dockerfile:1
#
# Static, non-root images: `sluice` (every subcommand: operator, authz, policy, crd, ...) and, with
# `--target authz`, the lean `sluice-authz` sidecar (the ext_authz server alone, no Kubernetes client).
#   docker build -t sluice:dev .
#   docker build --target authz -t sluice-authz:dev .
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
COPY rego/Cargo.toml rego/
COPY authz/Cargo.toml authz/
COPY operator/Cargo.toml operator/
COPY e2e/Cargo.toml e2e/
COPY testcluster/Cargo.toml testcluster/
COPY xtask/Cargo.toml xtask/
RUN for crate in rego authz operator e2e testcluster xtask; do \
        mkdir -p "$crate/src" && touch "$crate/src/lib.rs" && echo 'fn main() {}' > "$crate/src/main.rs"; \
    done \
    && mkdir -p rego/benches authz/benches operator/src/bin \
    && echo 'fn main() {}' > rego/benches/policy_eval.rs \
    && echo 'fn main() {}' > authz/benches/authz_load.rs \
    && echo 'fn main() {}' > operator/src/bin/kubectl-sluice.rs \
    && cargo build --release --locked --target "${TARGET}" -p sluice -p sluice-authz \
    && rm -rf rego authz operator e2e testcluster xtask

# 2. The real sources. Only `sluice` and the `sluice-authz` sidecar are built; the other members just need
#    to parse.
COPY rego rego
COPY authz authz
COPY operator operator
COPY e2e e2e
COPY testcluster testcluster
COPY tools tools
COPY xtask xtask
# Make sure cargo sees the sources as newer than the stub build.
RUN find rego authz operator -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --target "${TARGET}" -p sluice -p sluice-authz \
    && cp "target/${TARGET}/release/sluice" /sluice \
    && cp "target/${TARGET}/release/sluice-authz" /sluice-authz \
    && /sluice --version && /sluice-authz --version

# ---- the ext_authz sidecar alone (no Kubernetes client): docker build --target authz -t sluice-authz:dev .
FROM gcr.io/distroless/static-debian12:nonroot AS authz
COPY --from=builder /sluice-authz /sluice-authz
USER 65532:65532
# 9191: ext_authz gRPC, 8282: metrics and health probes.
EXPOSE 9191 8282
ENTRYPOINT ["/sluice-authz"]
CMD ["--help"]

# ---- runtime (the default target, last): distroless static, nonroot ------------------------------------------------------------------
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
