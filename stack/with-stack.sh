#!/usr/bin/env bash
# with-stack.sh CMD [ARGS...]
#
# Run CMD with the local service stack (Kafka, Redis, ZooKeeper; RabbitMQ too with
# FUSION_BROKER=rabbitmq) up and the stack's connection settings (.stack/env)
# exported into its environment.
#
# Services that were already running are reused and left running; services
# this script had to start are stopped again afterwards -- also when CMD fails
# or the script is interrupted. The exit code is CMD's (or 1 if the stack
# could not be brought up).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
STACK=("bash" "$HERE/stack.sh")
# the services of the topology asked for (FUSION_KAFKA_NODES: kafka, kafka-2, ...)
mapfile -t SERVICES < <("${STACK[@]}" services)

if (($# == 0)); then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi

started=()
# The broker of a stack already up (another may be asked for now): .stack/env names it again afterwards.
previous_broker="$(cat "$ROOT/.stack/broker" 2>/dev/null || true)"

# shellcheck disable=SC2317  # invoked from the EXIT trap
teardown() {
  if ((${#started[@]})); then
    echo "[with-stack] stopping what this run started: ${started[*]}"
    local i
    local -a order=()
    # reverse start order: the Kafka nodes (stopped together) before zookeeper
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do order+=("${started[$i]}"); done
    "${STACK[@]}" stop "${order[@]}" || true
  fi
  started=()
  # .stack/env names the broker the stack had before this run again (none recorded: Redis, and the next
  # `up` chooses again)
  if [[ "$previous_broker" != "$(cat "$ROOT/.stack/broker" 2>/dev/null || true)" ]]; then
    FUSION_BROKER="${previous_broker:-redis}" "${STACK[@]}" env || true
    [[ -n "$previous_broker" ]] || rm -f "$ROOT/.stack/broker"
  fi
}

trap 'teardown' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if "${STACK[@]}" status >/dev/null 2>&1; then
  echo "[with-stack] stack already up: reusing it (it stays up afterwards)"
  # a stack up with another broker (its RabbitMQ running too): .stack/env names the one asked for
  if [[ -n "${FUSION_BROKER:-}" && "$FUSION_BROKER" != "$previous_broker" ]]; then "${STACK[@]}" env; fi
else
  for svc in "${SERVICES[@]}"; do
    "${STACK[@]}" status "$svc" >/dev/null 2>&1 || started+=("$svc")
  done
  echo "[with-stack] starting: ${started[*]}"
  if ! "${STACK[@]}" up; then
    echo "[with-stack] the stack did not come up" >&2
    exit 1
  fi
fi

set -a
# shellcheck disable=SC1091
. "$ROOT/.stack/env"
set +a

rc=0
"$@" || rc=$?
exit "$rc"
