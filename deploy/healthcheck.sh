#!/bin/bash
# The image's HEALTHCHECK: GET /healthz on the worker's metrics listener
# (ML_WORKER_HEALTH_ADDRESS, host:port, default 127.0.0.1:9100; the
# listener itself is `metrics.address` in worker.yaml). Bash's /dev/tcp, so
# the image needs no HTTP client. Exit 0 on a 200, 1 otherwise.
addr="${ML_WORKER_HEALTH_ADDRESS:-127.0.0.1:9100}"
host="${addr%:*}"
port="${addr##*:}"
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$addr" >&3
IFS= read -r -t 5 status <&3 || exit 1
case "$status" in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "healthz: $status" >&2; exit 1 ;;
esac
