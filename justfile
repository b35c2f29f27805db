# The recipes users run. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Where prepared data and downloaded packages are cached.
export MADA_DATA := env_var_or_default("MADA_DATA", justfile_directory() / ".cache" / "data")

default:
    @just --list

# Run every test (what CI runs).
test:
    cargo test --workspace

# Time our Adam step against our MADA step (1M and 16M f32 parameters) and print the ratios.
bench-optimizer:
    cargo bench -p mada --bench optimizer

# Run one optimizer on a trace spec in f64: just trace SPEC.json OUT.csv
trace spec out:
    cargo run --release -q -p analysis -- trace {{spec}} --out {{out}}

# Check every convergence bound numerically and write reports/analysis/ (--quick: CI size).
bounds *args:
    cargo run --release -q -p analysis -- bounds {{args}}
