#!/usr/bin/env bash
# Puts the ONNX Runtime shared library (from the PyPI wheel; no other download
# source is needed) at .cache/onnxruntime/libonnxruntime.so, where ml-worker
# finds it by default. Idempotent: does nothing when the library is there.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cache/onnxruntime"
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [ -f "$lib" ]; then
  exit 0
fi
mkdir -p "$dest/wheel"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --python-version 3.11 \
  -d "$dest/wheel" "onnxruntime==$ORT_VERSION"
wheel=$(ls "$dest"/wheel/onnxruntime-"$ORT_VERSION"-*.whl | head -n 1)
python3 - "$wheel" "$lib" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so")]
    if not names:
        sys.exit(f"{wheel}: no libonnxruntime.so inside")
    with z.open(sorted(names, key=len)[-1]) as src, open(out + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(out + ".tmp", out)
PY
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
rm -rf "$dest/wheel"
echo "onnxruntime $ORT_VERSION -> $lib"
