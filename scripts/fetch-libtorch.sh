#!/usr/bin/env bash
# Assembles a CPU-only libtorch folder for tch from PyPI wheels (no other
# download source) at .cache/libtorch, as ../shared/PLATFORM.md describes:
#   include/                      torch/include from the torch wheel
#   lib/libtorch_cpu.so, libc10.so, libgomp.so.1   from the torch wheel
#   lib/libcudart.so.13, libcupti.so.13            from two small NVIDIA wheels
#                                 (libtorch_cpu links them; they load without a GPU)
#   lib/libtorch.so               a stand-in that only depends on libtorch_cpu
#                                 (the wheel's libtorch.so pulls the whole CUDA stack)
# The binary finds lib/ through an rpath set by build.rs, so nothing needs
# exporting at run time. Idempotent: does nothing when the folder is complete.
set -euo pipefail
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CUDART_VERSION="${CUDART_VERSION:-13.0.96}"
CUPTI_VERSION="${CUPTI_VERSION:-13.0.85}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cache/libtorch"
stamp="$dest/.version"
want="torch-$TORCH_VERSION cudart-$CUDART_VERSION cupti-$CUPTI_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -rf "$dest" "$dest.tmp"
mkdir -p "$dest.tmp/wheel" "$dest.tmp/lib"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_25_x86_64 \
  --platform manylinux_2_17_x86_64 --python-version 3.11 \
  -d "$dest.tmp/wheel" "torch==$TORCH_VERSION" \
  "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION"
python3 - "$dest.tmp" <<'PY'
import os, shutil, sys, zipfile, glob
out = sys.argv[1]
def copy(z, name, to):
    os.makedirs(os.path.dirname(to), exist_ok=True)
    with z.open(name) as src, open(to, "wb") as dst:
        shutil.copyfileobj(src, dst)
want_libs = {"libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libcudart.so.13", "libcupti.so.13"}
found = set()
for wheel in glob.glob(os.path.join(out, "wheel", "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            if n.startswith("torch/include/") and not n.endswith("/"):
                copy(z, n, os.path.join(out, "include", n[len("torch/include/"):]))
            elif base in want_libs and "/lib/" in n:
                copy(z, n, os.path.join(out, "lib", base))
                found.add(base)
missing = want_libs - found
if missing:
    sys.exit(f"libtorch: the wheels lack {sorted(missing)}")
PY
(
  cd "$dest.tmp/lib"
  echo 'void ml_worker_cpu_only_libtorch(void) {}' > stand-in.c
  gcc -shared -fPIC -o libtorch.so stand-in.c -Wl,--no-as-needed -L. -ltorch_cpu -Wl,-rpath,'$ORIGIN'
  rm stand-in.c
)
rm -rf "$dest.tmp/wheel"
echo "$want" > "$dest.tmp/.version"
mv "$dest.tmp" "$dest"
echo "libtorch (CPU, from torch $TORCH_VERSION wheels) -> $dest"
