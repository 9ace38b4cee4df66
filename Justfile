# Developer recipes. Each one runs the same command the README documents.

# List the recipes.
default:
    @just --list

# Build every crate in the workspace (debug).
build:
    cargo build --workspace

# Run every check: unit, property and end-to-end tests on a local control plane, then the fuzzers.
test:
    cargo xtask test

# The demo: a promoted canary, a rolled-back canary and a policy, on a local control plane.
demo:
    cargo xtask demo

# Regenerate the CRD YAML in crds/ from operator/src/api.
crds:
    cargo run -q -p sluice -- crd --out-dir crds

# Formatting and clippy, warnings as errors (what CI runs).
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# A local Kubernetes control plane for trying Sluice; then `export KUBECONFIG=$PWD/.cluster/admin.kubeconfig`.
cluster-up:
    cargo xtask cluster up

# Stop it.
cluster-down:
    cargo xtask cluster down

# Container image of the sluice binary.
image:
    docker build -t sluice:dev .
