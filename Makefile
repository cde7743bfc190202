# Every target does its own set-up; nothing needs to be installed by hand
# beyond the Rust toolchain, Python 3 and make.
.PHONY: demo demo-offline bench test test-kafka setup onnxruntime libtorch packages sqlite3 python-kafka lint build fixtures bench-models fuzz clean

CARGO ?= cargo
BIN := target/release/ml-worker
## Cargo features of every build here: the torch kind (libtorch from
## `make libtorch`) and TLS/SCRAM for Kafka (OpenSSL, Debian's libssl-dev
## from `make packages`); a plain `cargo build` leaves both out.
FEATURES ?= --features torch,ssl

## The README's first command: the streaming worker end to end on the embedded
## broker and the shipped models (feature events in; predictions, signals and
## dead letters out; a summary with throughput, latency and the audit rows).
demo: onnxruntime build
	$(BIN) demo

## The model runtime offline: registry, checksums, predictions, audit trail.
demo-offline: onnxruntime build
	@echo "== registered models (config/models.yaml)"
	$(BIN) models list
	@echo "== load and verify every model (SHA256, audit store data/audit.db)"
	$(BIN) models verify
	@echo "== predictions (first 5 rows of each sample file)"
	$(BIN) predict --model diabetes_lgbm --input tests/fixtures/lgb_regression.inputs.csv | head -n 5
	$(BIN) predict --model breast_cancer_xgb --input tests/fixtures/lgb_binary.inputs.csv | head -n 5
	$(BIN) predict --model wine_rf --input tests/fixtures/xgb_multiclass.inputs.csv | head -n 5
	@echo "== audit trail"
	$(BIN) audit show --limit 12
	$(BIN) audit verify

## The README's second command: everything CI runs. The build without
## libtorch or OpenSSL (no features) is linted, and its unit, registry and
## config tests run too (a TLS setting there is refused, saying to build
## with the ssl feature).
test: setup lint
	$(MAKE) validate-deploy
	$(CARGO) build --examples $(FEATURES)
	$(CARGO) test --all-targets $(FEATURES)
	$(CARGO) test --no-default-features --lib --test registry --test worker_config
	$(MAKE) test-kafka

## The Kafka-facing tests again, against a real Apache Kafka (4.1,
## assembled from Maven Central, single-node KRaft on loopback).
test-kafka:
	bash scripts/kafka-broker.sh run -- $(CARGO) test $(FEATURES) --test group --test worker

setup: onnxruntime libtorch packages python-kafka

## The deployment files (deploy/, docker-compose.yml) against their schemas
## and tools: compose spec, Kubernetes and KEDA schemas, hadolint, promtool
## (rules, alert unit tests); installs Debian's prometheus when missing,
## which tests/prometheus.rs then runs.
.PHONY: validate-deploy
validate-deploy:
	bash scripts/validate-deploy.sh

# confluent-kafka + fastavro: third-party clients for the interoperability tests
python-kafka:
	bash scripts/setup-python.sh kafka

onnxruntime:
	bash scripts/fetch-onnxruntime.sh

# CPU-only libtorch for the torch feature, from PyPI wheels (.cache/libtorch)
libtorch:
	bash scripts/fetch-libtorch.sh

# Debian packages, installed when missing: the audit tamper tests edit the
# store through the real sqlite3 shell; the HTTPS and Kafka TLS tests make
# their certificates with the openssl command; the `ssl` feature builds
# librdkafka against OpenSSL's headers (libssl-dev, found by pkg-config)
packages:
	@command -v sqlite3 >/dev/null || (apt-get update -qq && apt-get install -y -qq sqlite3 >/dev/null)
	@command -v openssl >/dev/null || (apt-get update -qq && apt-get install -y -qq openssl >/dev/null)
	@{ command -v pkg-config >/dev/null && pkg-config --exists openssl; } || (apt-get update -qq && apt-get install -y -qq pkg-config libssl-dev >/dev/null)
sqlite3: packages

lint: libtorch packages
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets $(FEATURES) -- -D warnings
	$(CARGO) clippy --all-targets --no-default-features -- -D warnings

build: libtorch packages
	$(CARGO) build --release $(FEATURES)

## Regenerate tests/fixtures and models/ with the reference libraries.
fixtures:
	bash scripts/setup-python.sh
	.cache/venv/bin/python tools/make_fixtures.py
	.cache/venv/bin/python tools/hostile_fixtures.py

## End to end on the embedded broker: pass-through baseline, worker
## throughput and latency at 20,000 events/s offered, in one run.
bench: onnxruntime build
	$(BIN) bench

## Native LightGBM evaluator vs LightGBM's Booster.predict, same run.
bench-models:
	bash scripts/bench-models.sh

## Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every parser of
## untrusted input: pickles, LightGBM text, XGBoost JSON/UBJSON, UBJSON,
## feature events, the YAML configs, the ONNX external-data rewriter; each
## seeded with the project's own files, FUZZ_SECONDS each (default 600).
## CI runs the bounded property tests instead (tests/*_props.rs, robustness.rs).
FUZZ_SECONDS ?= 600
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

clean:
	$(CARGO) clean
