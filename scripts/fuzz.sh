#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer with AddressSanitizer) of
# every parser that reads untrusted input, each seeded with the project's
# own files of its kind:
#   pickle_reader   pickles (the reader and the allowlist converters)
#   lightgbm_text   LightGBM text models
#   xgboost_model   XGBoost JSON and UBJSON models
#   ubjson          the UBJSON reader alone
#   feature_events  Kafka feature events, in every wire format
#   configs         models.yaml and worker.yaml
#   onnx_external   the ONNX external-data rewriter (protobuf)
# Usage: scripts/fuzz.sh SECONDS_PER_TARGET [TARGET...]; prints one line
# per target (runs, crashes). Crashes are left under fuzz/artifacts/.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pickle_reader lightgbm_text xgboost_model ubjson feature_events configs onnx_external)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
F=tests/fixtures
seed() {
  local t=$1; shift
  mkdir -p "fuzz/corpus/$t"
  for f in "$@"; do [ -f "$f" ] && cp "$f" "fuzz/corpus/$t/"; done
}
seed pickle_reader $F/*.pkl $F/hostile/*.pkl
seed lightgbm_text $F/lgb_*.txt $F/hostile/lgb_*.txt models/*.txt
seed xgboost_model $F/xgb_*.json $F/xgb_*.ubj $F/hostile/xgb_*
seed ubjson $F/xgb_*.ubj $F/hostile/xgb_*.ubj
seed feature_events fuzz/seeds/feature_events/*
seed configs config/*.yaml $F/config/invalid/*.yaml
seed onnx_external $F/*.onnx $F/hostile/*.onnx models/*.onnx
status=0
for t in "${targets[@]}"; do
  log="fuzz/$t.log"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=262144 -timeout=30) > "$log" 2>&1
  rc=$?
  runs=$(grep -oE '#[0-9]+' "$log" | tail -n 1 | tr -d '#')
  crashes=$(ls "fuzz/artifacts/$t" 2>/dev/null | wc -l)
  echo "$t: ${seconds}s, ${runs:-0} runs, exit $rc, ${crashes} crash file(s) (log: $log)"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
