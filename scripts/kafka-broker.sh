#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, broker+controller in one JVM)
# on loopback, for integration tests. The jars come from Maven Central
# (scripts/kafka/pom.xml, `dependency:copy-dependencies`), as
# ../shared/PLATFORM.md describes; needs java (17+) and mvn, and kcat or the
# broker log for the readiness check.
#
#   kafka-broker.sh fetch           jars -> .cache/kafka/<version>/libs (idempotent)
#   kafka-broker.sh start [DIR]     start a broker with its data and logs in DIR
#                                   (default: a fresh .cache/kafka/run-XXXXXX);
#                                   stdout: KAFKA_BROKER_DIR=DIR, the SASL_SSL
#                                   listener (KAFKA_SASL_SSL_BOOTSTRAP, its CA
#                                   KAFKA_SSL_CA, SCRAM-SHA-512 user
#                                   KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD),
#                                   then KAFKA_BOOTSTRAP=127.0.0.1:PORT (PLAINTEXT)
#                                   as the last line
#   kafka-broker.sh stop [DIR]      stop it and remove DIR (no DIR: every
#                                   .cache/kafka/run-* broker)
#   kafka-broker.sh run -- CMD...   start a broker, run CMD with those variables
#                                   exported, stop the broker whatever happens,
#                                   exit with CMD's status
#   kafka-broker.sh tool CLASS ARGS run a Kafka tool class from the same jars, e.g.
#                                   tool org.apache.kafka.tools.TopicCommand --bootstrap-server B --list
#
# Environment: KAFKA_VERSION (default 4.1.1), KAFKA_HEAP_OPTS (default
# "-Xms256m -Xmx512m"), KAFKA_LOG_LEVEL (log4j2 level for DIR/server.log,
# default INFO), KAFKA_START_TIMEOUT (seconds, default 60), KAFKA_KEEP_DIR=1
# (stop leaves DIR, with its server.log, in place), KAFKA_WARM_GROUPS=0 (skip
# the consumer-group warm-up at start).
set -euo pipefail
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION="${LOG4J_VERSION:-2.24.3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
base="$root/.cache/kafka"
dest="$base/$KAFKA_VERSION"
libs="$dest/libs"
stamp="$dest/.complete"
pom="$root/scripts/kafka/pom.xml"

say() { echo "kafka-broker: $*" >&2; }
die() { say "$*"; exit 1; }

fetch() {
  local want
  want="kafka-$KAFKA_VERSION log4j-$LOG4J_VERSION pom-$(sha256sum "$pom" | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  command -v java >/dev/null || die "java not found (OpenJDK 17: apt-get install -y openjdk-17-jre-headless)"
  command -v mvn >/dev/null || die "mvn not found (apt-get install -y maven)"
  say "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $libs"
  rm -rf "$dest" "$dest.tmp"
  mkdir -p "$dest.tmp" "$base"
  # The local repository stays under .cache so nothing lands in ~/.m2.
  mvn -B -q -Dstyle.color=never -f "$pom" \
    -Dmaven.repo.local="$base/m2" \
    -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$LOG4J_VERSION" \
    dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dest.tmp/libs" > "$base/mvn.log" 2>&1 \
    || { tail -n 30 "$base/mvn.log" >&2; die "mvn could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $base/mvn.log)"; }
  # The entry points this script uses must be in the jars of this version.
  local cls jar found
  for cls in kafka/Kafka kafka/tools/StorageTool org/apache/kafka/tools/TopicCommand; do
    found=""
    for jar in "$dest.tmp"/libs/kafka*.jar; do
      # python3's zipfile, not unzip: a fresh machine may lack unzip
      if python3 -c 'import sys, zipfile; sys.exit(sys.argv[2] not in zipfile.ZipFile(sys.argv[1]).namelist())' "$jar" "$cls.class" 2>/dev/null; then found=1; break; fi
    done
    [ -n "$found" ] || die "Kafka $KAFKA_VERSION jars lack ${cls//\//.}"
  done
  # log4j2 for the broker: everything to <run dir>/server.log, nothing on the console.
  cat > "$dest.tmp/log4j2.properties" <<'EOF'
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ${sys:kafka.log.level:-INFO}
rootLogger.appenderRef.file.ref = file
# Quiet the per-request and state-change chatter even at INFO.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
EOF
  echo "$want" > "$dest.tmp/.complete"
  mv "$dest.tmp" "$dest"
  say "Apache Kafka $KAFKA_VERSION ($(ls "$libs" | wc -l) jars, $(du -sh "$libs" | cut -f1)) -> $libs"
}

java_in() { # DIR CLASS ARGS...: a JVM on the broker's classpath, logging to DIR/server.log
  local dir="$1"; shift
  # shellcheck disable=SC2086
  java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dest/log4j2.properties" \
    -Dkafka.logs.dir="$dir" -Dkafka.log.level="${KAFKA_LOG_LEVEL:-INFO}" \
    -cp "$libs/*" "$@"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The broker's pid if DIR's broker is running (guarding against a reused pid).
broker_pid() {
  local dir="$1" pid
  [ -f "$dir/broker.pid" ] || return 1
  pid="$(cat "$dir/broker.pid")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/server.properties" || return 1
  echo "$pid"
}

# A CA and the broker's certificate (127.0.0.1, localhost) for the SASL_SSL
# listener, in DIR/tls: ca.pem for clients, server.pem (unencrypted PKCS#8
# key + certificate, Kafka's PEM keystore) for the broker.
write_tls() { # DIR
  local t="$1/tls"
  mkdir -p "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kafka-broker.sh test CA" \
    -keyout "$t/ca.key" -out "$t/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$t/san.ext"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 2 -extfile "$t/san.ext" -out "$t/server.crt" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$t/server.key" > "$t/server.pem"
  cat "$t/server.crt" >> "$t/server.pem"
  rm -f "$t/ca.key" "$t/server.key" "$t/server.csr" "$t/ca.srl"
}

write_properties() { # DIR BROKER_PORT CONTROLLER_PORT SASL_SSL_PORT
  cat > "$1/server.properties" <<EOF
# Written by scripts/kafka-broker.sh: single-node KRaft broker for tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$3
listeners=PLAINTEXT://127.0.0.1:$2,CONTROLLER://127.0.0.1:$3,SASL_SSL://127.0.0.1:$4
advertised.listeners=PLAINTEXT://127.0.0.1:$2,SASL_SSL://127.0.0.1:$4
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$1/tls/server.pem
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$1/data
num.partitions=1
auto.create.topics.enable=true
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.retention.hours=1
EOF
}

start() {
  fetch
  local dir="${1:-}"
  if [ -z "$dir" ]; then
    mkdir -p "$base"
    dir="$(mktemp -d "$base/run-XXXXXX")"
  else
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if broker_pid "$dir" >/dev/null; then die "a broker already runs in $dir (stop it first)"; fi
    [ -z "$(ls -A "$dir")" ] || [ -f "$dir/.kafka-broker-run" ] || die "$dir is not empty and not a broker dir"
    rm -rf "$dir/data" "$dir/server.log" "$dir/broker.out" "$dir/bootstrap"
  fi
  touch "$dir/.kafka-broker-run"
  local timeout="${KAFKA_START_TIMEOUT:-60}" t0 attempt port cport sport cid pid addr password
  command -v openssl >/dev/null || die "openssl not found (apt-get install -y openssl; make packages)"
  t0=$(date +%s.%N)
  write_tls "$dir"
  password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')"
  for attempt in 1 2 3; do
    port="$(free_port)"; cport="$(free_port)"; sport="$(free_port)"
    [ "$port" != "$cport" ] && [ "$port" != "$sport" ] && [ "$cport" != "$sport" ] || continue
    write_properties "$dir" "$port" "$cport" "$sport"
    rm -rf "$dir/data"
    cid="$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode())')"
    # the SASL_SSL listener's one SCRAM user
    java_in "$dir" kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" \
      --add-scram "SCRAM-SHA-512=[name=ml-worker,password=$password]" \
      > "$dir/format.out" 2>&1 || { cat "$dir/format.out" >&2; die "storage format failed"; }
    # setsid: the broker is not in the caller's process group, so a Ctrl-C
    # reaches the caller (whose trap stops the broker) rather than the JVM.
    setsid bash -c 'echo $$ > "$1/broker.pid"; shift; exec "$@"' _ "$dir" \
      java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$dest/log4j2.properties" \
      -Dkafka.logs.dir="$dir" -Dkafka.log.level="${KAFKA_LOG_LEVEL:-INFO}" \
      -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
      > "$dir/broker.out" 2>&1 < /dev/null &
    # Wait for the pid file, then for the port, then for a metadata answer.
    local deadline=$(( $(date +%s) + timeout )) ready=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
      if [ -s "$dir/broker.pid" ]; then
        pid="$(cat "$dir/broker.pid")"
        kill -0 "$pid" 2>/dev/null || break
        if port_open "$port"; then
          if command -v kcat >/dev/null; then
            if kcat -b "127.0.0.1:$port" -L -m 2 2>/dev/null | grep -q '1 brokers:'; then ready=1; break; fi
          elif grep -q 'Kafka Server started' "$dir/server.log" 2>/dev/null; then
            ready=1; break
          fi
        fi
      fi
      sleep 0.2
    done
    [ -z "$ready" ] || break
    if grep -q 'Address already in use' "$dir/server.log" "$dir/broker.out" 2>/dev/null && [ "$attempt" -lt 3 ]; then
      say "port taken meanwhile, retrying with other ports"
      stop_dir "$dir" keep; continue
    fi
    tail -n 30 "$dir/server.log" "$dir/broker.out" >&2 2>/dev/null || true
    stop_dir "$dir" keep
    die "broker did not answer within ${timeout}s (logs kept in $dir)"
  done
  addr="127.0.0.1:$port"
  # The first consumer group on a fresh broker waits ~3 s in librdkafka while
  # __consumer_offsets is created and its coordinator loads; one throw-away
  # group join here (~2.5 s) makes the tests' first group join take ~0.1 s.
  if [ "${KAFKA_WARM_GROUPS:-1}" = 1 ] && command -v kcat >/dev/null; then
    timeout 20 kcat -b "$addr" -G kafka-broker-sh-warmup -q -e -o end __consumer_offsets \
      >/dev/null 2>&1 || say "consumer-group warm-up did not finish (ignored)"
  fi
  echo "$addr" > "$dir/bootstrap"
  say "Apache Kafka $KAFKA_VERSION up at $addr, SASL_SSL at 127.0.0.1:$sport (pid $pid, $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s, log $dir/server.log)"
  echo "KAFKA_BROKER_DIR=$dir"
  echo "KAFKA_SASL_SSL_BOOTSTRAP=127.0.0.1:$sport"
  echo "KAFKA_SSL_CA=$dir/tls/ca.pem"
  echo "KAFKA_SASL_USERNAME=ml-worker"
  echo "KAFKA_SASL_PASSWORD=$password"
  echo "KAFKA_BOOTSTRAP=$addr"
}

stop_dir() { # DIR [keep]
  local dir="$1" pid i
  if pid="$(broker_pid "$dir")"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do # 20 s
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "broker $pid ignored SIGTERM for 20 s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    say "stopped broker $pid ($dir)"
  fi
  rm -f "$dir/broker.pid"
  if [ "${2:-}" = keep ] || [ "${KAFKA_KEEP_DIR:-}" = 1 ]; then
    rm -rf "$dir/data"
  elif [ -f "$dir/.kafka-broker-run" ]; then
    rm -rf "$dir"
  fi
}

stop() {
  local dir
  if [ -n "${1:-}" ]; then
    [ -d "$1" ] || die "no such dir: $1"
    dir="$(cd "$1" && pwd)"
    [ -f "$dir/.kafka-broker-run" ] || die "$dir is not a broker dir"
    stop_dir "$dir"
  else
    for dir in "$base"/run-*; do
      [ -f "$dir/.kafka-broker-run" ] && stop_dir "$dir"
    done
  fi
  return 0
}

run() {
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || die "usage: $0 run -- CMD [ARGS...]"
  local out dir rc
  # the broker's dir and the traps first: a signal while it starts
  # (it runs in its own session) still stops it and removes the dir
  mkdir -p "$base"
  dir="$(mktemp -d "$base/run-XXXXXX")"
  KAFKA_BROKER_DIR="$dir"
  trap 'stop_dir "$KAFKA_BROKER_DIR"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  out="$(start "$dir")" || exit 1
  KAFKA_BOOTSTRAP="$(sed -n 's/^KAFKA_BOOTSTRAP=//p' <<<"$out")"
  KAFKA_SASL_SSL_BOOTSTRAP="$(sed -n 's/^KAFKA_SASL_SSL_BOOTSTRAP=//p' <<<"$out")"
  KAFKA_SSL_CA="$(sed -n 's/^KAFKA_SSL_CA=//p' <<<"$out")"
  KAFKA_SASL_USERNAME="$(sed -n 's/^KAFKA_SASL_USERNAME=//p' <<<"$out")"
  KAFKA_SASL_PASSWORD="$(sed -n 's/^KAFKA_SASL_PASSWORD=//p' <<<"$out")"
  export KAFKA_BOOTSTRAP KAFKA_BROKER_DIR KAFKA_SASL_SSL_BOOTSTRAP KAFKA_SSL_CA \
    KAFKA_SASL_USERNAME KAFKA_SASL_PASSWORD
  # CMD runs in the background so that a SIGTERM/SIGINT sent to this script
  # is handled at once: passed on to CMD, then the broker is stopped.
  local child sig=""
  "$@" <&0 &
  child=$!
  trap 'sig=143; kill -TERM "$child" 2>/dev/null' TERM
  trap 'sig=130; kill -INT "$child" 2>/dev/null' INT
  set +e
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  set -e
  exit "${sig:-$rc}"
}

case "${1:-}" in
  fetch) fetch ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  run) shift; run "$@" ;;
  tool) shift; fetch; [ $# -gt 0 ] || die "usage: $0 tool CLASS [ARGS...]"
        tdir="$(mktemp -d)"; trap 'rm -rf "$tdir"' EXIT
        KAFKA_HEAP_OPTS="${KAFKA_TOOL_HEAP_OPTS:--Xmx256m}" java_in "$tdir" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2; exit 2 ;;
esac
