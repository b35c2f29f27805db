#!/usr/bin/env bash
# Build paper-repro with CUDA (the real nvcc 13.0, link-only stubs: see cuda-env.sh) and pack
# what a GPU machine needs to run it into one .tar.xz (`just gpu-bundle`):
#
#   paper-repro-gpu/bin/paper-repro   the stripped release binary (sm_90a PTX embedded)
#   paper-repro-gpu/lib/              libraries it links that a bare GPU machine may lack
#                                     (fontconfig, freetype and their dependencies: plotters)
#   paper-repro-gpu/experiments/      the catalog, for `reproduce paper`
#   paper-repro-gpu/run.sh            sets LD_LIBRARY_PATH and runs the binary
#
# The CUDA libraries themselves (libcuda from the driver; libcublas, libcublasLt, libcurand,
# libnvrtc of CUDA 13) are not packed (but for the small libcudart.so.13): run.sh finds them,
# including inside an installed PyTorch's nvidia-* wheels. On the GPU machine:
#
#   tar xf paper-repro-gpu.tar.xz && paper-repro-gpu/run.sh gpu-check --out gpu-check
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${1:-.cache/gpu-bundle/paper-repro-gpu.tar.xz}"
target="${CARGO_TARGET_DIR:-$HOME/.cache/mada-workspace/target}-cuda"
CARGO_TARGET_DIR="$target" paper-repro/gpu/cuda-env.sh toolkit -- cargo build --release -p paper-repro --features cuda

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/paper-repro-gpu"
mkdir -p "$root/bin" "$root/lib"
strip -o "$root/bin/paper-repro" "$target/release/paper-repro"
cp -r experiments "$root/experiments"

# Non-CUDA shared libraries outside the C runtime, as this machine resolves them.
ldd "$target/release/paper-repro" | awk '/=> \// {print $1, $3}' | while read -r name path; do
    case "$name" in
    libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | libgcc_s.so* | libstdc++.so* | ld-linux*) ;;
    libcuda.so* | libcublas* | libcurand* | libnvrtc* | libcudart* | libnccl*) ;;
    *) cp -L "$path" "$root/lib/$name" ;;
    esac
done

# The CUDA runtime is small and version-bound: ship the toolkit's own (13.0).
cp -L "${MADA_CUDA_CACHE:-$HOME/.cache/mada-workspace/cuda}/toolkit-13.0/nvidia/cu13/lib/libcudart.so.13" "$root/lib/"

cat >"$root/run.sh" <<'EOF'
#!/usr/bin/env bash
# Run the bundled paper-repro with its libraries and the machine's CUDA 13 libraries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
paths="$here/lib"
# CUDA 13 libraries shipped in Python wheels (PyTorch's nvidia-* dependencies), if any.
for py in python3 python; do
    command -v "$py" >/dev/null 2>&1 || continue
    site=$("$py" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null) || continue
    for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib; do
        [ -d "$d" ] && paths="$paths:$d"
    done
    break
done
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64; do
    [ -d "$d" ] && paths="$paths:$d"
done
export LD_LIBRARY_PATH="$paths${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Without the driver's libcuda (no GPU) or CUDA 13's cublas/curand the binary cannot start:
# say which, in one line (gpu-check then succeeds, as the built-in check does without CUDA).
missing=$(ldd "$here/bin/paper-repro" 2>/dev/null | awk '/not found/ {printf "%s ", $1}')
if [ -n "$missing" ]; then
    if [ "${1:-}" = gpu-check ]; then
        echo "gpu-check: skipped: no usable CUDA here (missing ${missing% })"
        exit 0
    fi
    echo "paper-repro-gpu: missing ${missing% } (a CUDA driver and CUDA 13 libraries are needed)" >&2
    exit 1
fi
exec "$here/bin/paper-repro" "$@"
EOF
chmod +x "$root/run.sh"

mkdir -p "$(dirname "$out")"
tar -C "$stage" -cJf "$out.partial" paper-repro-gpu
mv "$out.partial" "$out"
size=$(stat -c %s "$out")
echo "gpu-bundle: $out ($((size / 1024 / 1024)) MiB; limit 64 MiB)"
[ "$size" -le $((64 * 1024 * 1024)) ] || { echo "gpu-bundle: larger than 64 MiB" >&2; exit 1; }
