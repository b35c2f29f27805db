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
# libnvrtc, libcudart of CUDA 13) are not packed: run.sh finds them where the machine has them,
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
exec "$here/bin/paper-repro" "$@"
EOF
chmod +x "$root/run.sh"

mkdir -p "$(dirname "$out")"
tar -C "$stage" -cJf "$out.partial" paper-repro-gpu
mv "$out.partial" "$out"
size=$(stat -c %s "$out")
echo "gpu-bundle: $out ($((size / 1024 / 1024)) MiB; limit 64 MiB)"
[ "$size" -le $((64 * 1024 * 1024)) ] || { echo "gpu-bundle: larger than 64 MiB" >&2; exit 1; }
