#!/usr/bin/env bash
# Run a command with what a `--features cuda` build needs, on a machine without CUDA:
#
#   paper-repro/gpu/cuda-env.sh check   -- cargo check --workspace --features cuda
#   paper-repro/gpu/cuda-env.sh toolkit -- cargo build --release -p paper-repro --features cuda
#
# `check`: an nvcc stand-in that reports CUDA 13.0 and writes empty outputs. `cargo check`
#   runs candle-kernels' and cudarc's build scripts (they call nvcc) but links nothing, so this
#   is enough to type-check every cfg(feature = "cuda") line, in a few minutes (CI).
# `toolkit`: the real CUDA 13.0 compiler, installed from NVIDIA's PyPI wheels (pinned: the GPU
#   machines' driver 580 / CUDA 13.0 rejects PTX from a newer nvcc), and link-only stub
#   libraries generated from the symbols cudarc declares (libcuda, libnvrtc, libcurand,
#   libcublas, libcublasLt, libnccl): the binary links here and loads the real libraries on the
#   GPU machine.
#
# Everything is cached in $MADA_CUDA_CACHE (default ~/.cache/mada-workspace/cuda); the first
# `toolkit` run downloads about 104 MB. CUDA_COMPUTE_CAP defaults to 90 (H100/H200: sm_90a).
set -euo pipefail

mode="${1:-}"
shift || true
[ "${1:-}" = "--" ] && shift
if [ "$mode" != check ] && [ "$mode" != toolkit ] || [ $# -eq 0 ]; then
    echo "usage: $0 check|toolkit -- COMMAND..." >&2
    exit 2
fi

cache="${MADA_CUDA_CACHE:-$HOME/.cache/mada-workspace/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
mkdir -p "$cache"

# The wheels of CUDA 13.0 (nvcc, its NVVM backend, the CRT headers, the runtime, CCCL).
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85)

standin() {
    local home="$cache/standin"
    mkdir -p "$home/bin" "$home/include" "$home/lib64"
    cat >"$home/bin/nvcc" <<'EOF'
#!/usr/bin/env bash
# nvcc stand-in for `cargo check`: the version line cudarc parses, empty outputs otherwise.
for a in "$@"; do
    case "$a" in
    --version | -V)
        printf '%s\n' "nvcc: NVIDIA (R) Cuda compiler driver (stand-in of paper-repro/gpu/cuda-env.sh)" \
            "Copyright (c) 2005-2025 NVIDIA Corporation" "Built on stand-in" \
            "Cuda compilation tools, release 13.0, V13.0.88" "Build cuda_13.0.r13.0/stand-in"
        exit 0
        ;;
    --list-gpu-code | --list-gpu-arch)
        echo sm_90
        exit 0
        ;;
    esac
done
# `-o FILE`, or `--ptx --output-directory DIR SOURCE.cu` (one SOURCE.ptx per source).
out="" dir="" ptx=0 sources=()
while [ $# -gt 0 ]; do
    case "$1" in
    -o | --output-file) out="$2"; shift ;;
    --output-directory | -odir) dir="$2"; shift ;;
    --ptx) ptx=1 ;;
    *.cu) sources+=("$1") ;;
    esac
    shift
done
if [ -n "$out" ]; then
    : >"$out"
elif [ "$ptx" = 1 ]; then
    for s in "${sources[@]}"; do
        n=$(basename "$s" .cu)
        : >"${dir:-.}/$n.ptx"
    done
fi
exit 0
EOF
    chmod +x "$home/bin/nvcc"
    export CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH"
}

stubs() {
    local out="$cache/stubs" cudarc
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$cudarc" ]; then
        cargo fetch >/dev/null
        cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
    fi
    mkdir -p "$out"
    # library : cudarc module : soname
    for entry in cuda:driver:libcuda.so.1 nvrtc:nvrtc:libnvrtc.so.13 curand:curand:libcurand.so.10 \
        cublas:cublas:libcublas.so.13 cublasLt:cublaslt:libcublasLt.so.13 nccl:nccl:libnccl.so.2; do
        IFS=: read -r lib module soname <<<"$entry"
        [ -f "$out/lib$lib.so" ] && continue
        # Every function of the module's extern blocks, as an empty C function.
        grep -ohE '^[[:space:]]+fn [A-Za-z0-9_]+\(' "$cudarc/src/$module/sys/mod.rs" | sed -E 's/.*fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' |
            sort -u >"$out/$lib.c"
        cc -shared -fPIC -o "$out/lib$lib.so" -Wl,-soname,"$soname" "$out/$lib.c"
        rm "$out/$lib.c"
    done
    export LIBRARY_PATH="$out${LIBRARY_PATH:+:$LIBRARY_PATH}"
}

toolkit() {
    local root="$cache/toolkit-13.0"
    if [ ! -x "$root/nvidia/cu13/bin/nvcc" ]; then
        local python
        python=$(command -v python3 || true)
        [ -n "$python" ] || { echo "cuda-env: python3 (with pip) is needed to fetch the CUDA wheels" >&2; exit 1; }
        mkdir -p "$cache/wheels"
        "$python" -m pip download --quiet --no-deps -d "$cache/wheels" "${wheels[@]}"
        rm -rf "$root.partial" && mkdir -p "$root.partial"
        for w in "$cache"/wheels/*.whl; do
            "$python" -m zipfile -e "$w" "$root.partial"
        done
        chmod +x "$root.partial"/nvidia/cu13/bin/* "$root.partial"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
        mv "$root.partial" "$root"
    fi
    local home="$root/nvidia/cu13"
    # The runtime wheel ships libcudart.so.13 only; the link step wants the unversioned name.
    [ -e "$home/lib/libcudart.so" ] || ln -s libcudart.so.13 "$home/lib/libcudart.so"
    [ -e "$home/lib64" ] || ln -s lib "$home/lib64"
    export CUDA_HOME="$home" CUDA_PATH="$home" PATH="$home/bin:$PATH"
    # CCCL (cub, thrust) sits in include/cccl in the wheels, not on nvcc's default path.
    export NVCC_PREPEND_FLAGS="-I$home/include/cccl ${NVCC_PREPEND_FLAGS:-}"
    stubs
}

case "$mode" in
check) standin ;;
toolkit) toolkit ;;
esac
exec "$@"
