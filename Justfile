# Developer recipes. Each one runs the same command the README documents.

# List the recipes.
default:
    @just --list

# Build every crate in the workspace (debug).
build:
    cargo build --workspace

# Run every check: unit, property and end-to-end tests against the sandbox.
test:
    cargo xtask test

# Start the sandbox, apply the CRDs and samples, and show them (`--keep` leaves it running).
demo:
    cargo xtask demo

# Regenerate the CRD YAML in crds/ from operator/src/api.
crds:
    cargo run -q -p sluice -- crd --out-dir crds

# Formatting and clippy, warnings as errors (what CI runs).
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Local Kubernetes-API sandbox for trying Sluice; then `export KUBECONFIG=.sandbox/kubeconfig`.
sandbox:
    mkdir -p .sandbox
    cargo run -q -p sluice-e2e --bin sluice-sandbox -- --listen 127.0.0.1:6443 --kubeconfig .sandbox/kubeconfig

# Container image of the sluice binary.
image:
    docker build -t sluice:dev .
