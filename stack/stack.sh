#!/usr/bin/env bash
# Local service stack for fusion-celery: Kafka (KRaft: one node, or a cluster of
# FUSION_KAFKA_NODES), Redis, ZooKeeper and, as the Celery broker if asked, RabbitMQ as plain
# processes on 127.0.0.1 (no Docker).
#
#   stack/stack.sh up                  start whatever is not running, wait until ready
#   stack/stack.sh down                stop everything (by PID from the pidfiles)
#   stack/stack.sh status [SERVICE..] print state; exit 0 if all (given) are up, else 3
#   stack/stack.sh stop SERVICE..      stop services (data is kept; Kafka nodes together)
#   stack/stack.sh start SERVICE       start one service on its existing data dirs
#   stack/stack.sh restart SERVICE     stop + start
#   stack/stack.sh services            print the services of this topology
#   stack/stack.sh env                 write .stack/env for this topology and broker (starts no service)
#   stack/stack.sh rabbitmqctl ARGS..  Debian's rabbitmqctl against the stack's RabbitMQ node
#   stack/stack.sh cli                 Kafka's CLI tools into .stack/bin (kafka-tools jars, fetched once) and kcat
#                                      (apt-get) when missing; prints the bin folder (no service is started)
#   SERVICE: kafka | kafka-2 .. kafka-N | redis | zookeeper | rabbitmq  (kafka is node 1; kafka-1 names it
#            too; rabbitmq is a service of the stack with FUSION_BROKER=rabbitmq)
#
# State lives in <repo>/.stack/ (pids/, logs/, data/, conf/, env). The Java
# services' jars are fetched once from Maven Central (stack/*-pom.xml) into
# ${FUSION_STACK_CACHE:-$HOME/.cache/fusion-celery}, outside the repo.
#
# Environment knobs (defaults in brackets):
#   FUSION_KAFKA_NODES [1]  Kafka nodes, each broker and controller (N > 1: a quorum of N voters, topics
#       replicated min(3, N) times with min.insync.replicas 2). `up` records it in .stack/kafka-nodes, which
#       the other commands read when the variable is not set; `down` forgets it. Each topology keeps its own
#       data (.stack/data/kafka for one node, .stack/data/kafka-<N>nodes/node-<i> for a cluster).
#   FUSION_KAFKA_PORT [9092]  FUSION_KAFKA_CONTROLLER_PORT [9093]
#   FUSION_KAFKA_SASL_PORT [FUSION_KAFKA_PORT + 2]  SASL_PLAINTEXT listener (SCRAM-SHA-256, ACLs enforced)
#       Node i of a cluster listens on each of these ports + 100 * (i - 1): 9092, 9192, 9292, ...
#   FUSION_REDIS_PORT [6379]  FUSION_ZOOKEEPER_PORT [2181]
#   FUSION_BROKER [redis]  the Celery broker: redis, or rabbitmq (RabbitMQ is started too: Debian's
#       rabbitmq-server, apt-installed when missing; the result backend stays Redis). `up` records it in
#       .stack/broker, which the other commands read when the variable is not set; `down` forgets it.
#   FUSION_RABBITMQ_PORT [5672]  AMQP listener;  FUSION_RABBITMQ_DIST_PORT [FUSION_RABBITMQ_PORT + 20000]
#       Erlang distribution (rabbitmqctl reaches the node through it);  FUSION_EPMD_PORT [4369] the Erlang
#       port mapper the node registers with (started by the node if none runs there; `down` then stops it)
#   FUSION_STACK_CACHE [~/.cache/fusion-celery]  FUSION_STACK_TIMEOUT [90] (seconds per service)
#   FUSION_REDIS_PERSIST [0]  1 = appendonly yes (redis data survives stop/start)
#   Prefer ports below 32768: in the kernel's ephemeral range (32768-60999 by default) a client that
#   keeps reconnecting to a stopped service's port can connect to itself and hold the port for a
#   while (start then waits for it); `sysctl net.ipv4.ip_local_reserved_ports=...` prevents that.
#   FUSION_KAFKA_HEAP ["-Xms256m -Xmx512m"]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_SRC="$ROOT/stack"
STATE="$ROOT/.stack"
PID_DIR="$STATE/pids"
LOG_DIR="$STATE/logs"
DATA_DIR="$STATE/data"
CONF_DIR="$STATE/conf"
ENV_FILE="$STATE/env"
CACHE="${FUSION_STACK_CACHE:-${HOME:-/root}/.cache/fusion-celery}"

HOST=127.0.0.1
KAFKA_PORT="${FUSION_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${FUSION_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_SASL_PORT="${FUSION_KAFKA_SASL_PORT:-$((KAFKA_PORT + 2))}"
REDIS_PORT="${FUSION_REDIS_PORT:-6379}"
ZOOKEEPER_PORT="${FUSION_ZOOKEEPER_PORT:-2181}"
READY_TIMEOUT="${FUSION_STACK_TIMEOUT:-90}"
STOP_TIMEOUT=20
KAFKA_HEAP="${FUSION_KAFKA_HEAP:--Xms256m -Xmx512m}"
JAVA="${JAVA:-java}"

RABBITMQ_PORT="${FUSION_RABBITMQ_PORT:-5672}"
RABBITMQ_DIST_PORT="${FUSION_RABBITMQ_DIST_PORT:-$((RABBITMQ_PORT + 20000))}"
EPMD_PORT="${FUSION_EPMD_PORT:-4369}"
RABBITMQ_NODE="fusion-$RABBITMQ_PORT@localhost"

NODES_FILE="$STATE/kafka-nodes"
BROKER_FILE="$STATE/broker"
BROKER="${FUSION_BROKER:-$(cat "$BROKER_FILE" 2>/dev/null || echo redis)}"
[[ "$BROKER" == redis || "$BROKER" == rabbitmq ]] || {
  echo "[stack] ERROR: FUSION_BROKER must be redis or rabbitmq, got '$BROKER'" >&2; exit 2; }
KAFKA_NODES="${FUSION_KAFKA_NODES:-$(cat "$NODES_FILE" 2>/dev/null || echo 1)}"
[[ "$KAFKA_NODES" =~ ^[1-9]$ ]] || { echo "[stack] ERROR: FUSION_KAFKA_NODES must be 1..9, got '$KAFKA_NODES'" >&2; exit 2; }

# kafka_services: node 1 is "kafka", node i > 1 is "kafka-i".
kafka_services() {
  local i
  echo kafka
  for ((i = 2; i <= KAFKA_NODES; i++)); do echo "kafka-$i"; done
}
mapfile -t KAFKA_SERVICES < <(kafka_services)
SERVICES=(zookeeper redis "${KAFKA_SERVICES[@]}")
if [[ "$BROKER" == rabbitmq ]]; then SERVICES+=(rabbitmq); fi

# Python used for the Kafka readiness probe (needs confluent_kafka).
if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi

# ----------------------------------------------------------------------------
# helpers

say() { printf '[stack] %s\n' "$*"; }
err() { printf '[stack] ERROR: %s\n' "$*" >&2; }

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }          # seconds with µs
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# canonical SERVICE: kafka-1 is kafka; anything else as given.
canonical() { if [[ "${1:-}" == kafka-1 ]]; then echo kafka; else echo "${1:-}"; fi; }

valid_service() {
  local svc
  for svc in "${SERVICES[@]}"; do [[ "$svc" == "$(canonical "${1:-}")" ]] && return 0; done
  return 1
}

is_kafka() { [[ "$1" == kafka || "$1" == kafka-* ]]; }

# node_of SERVICE: the Kafka node id of a kafka service (kafka: 1, kafka-i: i).
node_of() { if [[ "$1" == kafka ]]; then echo 1; else echo "${1#kafka-}"; fi; }

# Ports of Kafka node i (1-based): each base port + 100 * (i - 1).
kafka_port() { echo $((KAFKA_PORT + 100 * ($1 - 1))); }
controller_port() { echo $((KAFKA_CONTROLLER_PORT + 100 * ($1 - 1))); }
sasl_port() { echo $((KAFKA_SASL_PORT + 100 * ($1 - 1))); }

endpoint() {
  local n
  case "$1" in
    kafka*) n="$(node_of "$1")"
            echo "$HOST:$(kafka_port "$n") (SASL $HOST:$(sasl_port "$n"), controller $HOST:$(controller_port "$n"))" ;;
    redis) echo "redis://$HOST:$REDIS_PORT" ;;
    zookeeper) echo "$HOST:$ZOOKEEPER_PORT" ;;
    rabbitmq) echo "amqp://$HOST:$RABBITMQ_PORT (node $RABBITMQ_NODE, dist $RABBITMQ_DIST_PORT, epmd $EPMD_PORT)" ;;
  esac
}

# every port SERVICE listens on
ports_of() {
  local n
  case "$1" in
    kafka*) n="$(node_of "$1")"; echo "$(kafka_port "$n") $(controller_port "$n") $(sasl_port "$n")" ;;
    redis) echo "$REDIS_PORT" ;;
    zookeeper) echo "$ZOOKEEPER_PORT" ;;
    rabbitmq) echo "$RABBITMQ_PORT $RABBITMQ_DIST_PORT" ;;
  esac
}

# comma-separated list of every node's PORT_FN port
kafka_list() {
  local fn="$1" i out=""
  for ((i = 1; i <= KAFKA_NODES; i++)); do out+="${out:+,}$HOST:$("$fn" "$i")"; done
  echo "$out"
}

pidfile() { echo "$PID_DIR/$1.pid"; }
logfile() { echo "$LOG_DIR/$1.log"; }

# String that must appear in /proc/PID/cmdline for the pid to be "ours"
# (guards against a recycled pid after a reboot / crash).
cmd_marker() {
  case "$1" in
    kafka*) echo "kafka.Kafka" ;;
    zookeeper) echo "QuorumPeerMain" ;;
    redis) echo "redis-server" ;;   # redis rewrites its title to "redis-server 127.0.0.1:PORT"
    rabbitmq) echo "-s rabbit boot" ;;   # the Erlang VM (beam.smp) that rabbitmq-server execs
  esac
}

pid_alive() {  # pid_alive SERVICE PID
  local pid="$2"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 0   # no procfs: trust kill -0
  local cmd
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ -z "$cmd" ]] && return 1                  # zombie
  [[ "$cmd" == *"$(cmd_marker "$1")"* ]]
}

# Echo the live pid of SERVICE (from its pidfile) or return 1.
service_pid() {
  local f pid
  f="$(pidfile "$1")"
  [[ -s "$f" ]] || return 1
  pid="$(head -n1 "$f" 2>/dev/null || true)"
  pid_alive "$1" "$pid" || return 1
  echo "$pid"
}

port_open() {  # TCP connect probe on 127.0.0.1:PORT
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# Readiness probes ------------------------------------------------------------

redis_ready() {
  [[ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null || true)" == "PONG" ]]
}

# An AMQP connection as guest (allowed from loopback) opens: the broker serves clients.
rabbitmq_ready() {
  port_open "$RABBITMQ_PORT" || return 1
  timeout 10 "$PYTHON" - "$HOST:$RABBITMQ_PORT" >/dev/null 2>&1 <<'PY'
import sys
import amqp
c = amqp.Connection(sys.argv[1], connect_timeout=5)
c.connect()
c.close()
PY
}

zk_4lw() {  # zk_4lw WORD -> the server's answer
  timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$ZOOKEEPER_PORT && printf $1 >&3 && cat <&3" 2>/dev/null || true
}

# `ruok` only says the process is alive (it answers imok even when the server
# thread has died while loading data); `srvr` reports "Mode: standalone" only
# once the server is actually serving requests.
zookeeper_ready() {
  [[ "$(zk_4lw ruok)" == "imok" ]] && [[ "$(zk_4lw srvr)" == *"Mode: "* ]]
}

have_confluent_kafka() {
  [[ -n "${_HAVE_CK:-}" ]] || {
    if "$PYTHON" -c 'import confluent_kafka' >/dev/null 2>&1; then _HAVE_CK=1; else _HAVE_CK=0; fi
  }
  [[ "$_HAVE_CK" == 1 ]]
}

# A Kafka node is ready when the cluster's metadata, asked of that node, lists it as a broker (a
# broker is listed once the controller has unfenced it).
kafka_ready() {
  local svc="$1" n port
  n="$(node_of "$svc")"
  port="$(kafka_port "$n")"
  port_open "$port" || return 1
  if have_confluent_kafka; then
    timeout 15 "$PYTHON" - "$HOST:$port" "$n" >/dev/null 2>&1 <<'PY'
import sys
from confluent_kafka.admin import AdminClient
md = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0}).list_topics(timeout=5)
sys.exit(0 if int(sys.argv[2]) in md.brokers else 1)
PY
  else
    # No client library yet (fresh machine before `make venv`): fall back to the broker's own log.
    grep -q "Kafka Server started" "$(logfile "$svc")" 2>/dev/null
  fi
}

service_ready() {
  case "$1" in kafka*) kafka_ready "$1" ;; *) "${1}_ready" ;; esac
}

# ----------------------------------------------------------------------------
# jars from Maven Central (cached outside the repo)

pom_property() {  # pom_property POM NAME
  sed -n "s:.*<$2>[[:space:]]*\([^<[:space:]]*\)[[:space:]]*</$2>.*:\1:p" "$1" | head -n1
}

# ensure_libs NAME -> sets LIBS to the folder with all runtime jars.
# A marker file holding the pom's checksum says the copy is complete; with it
# present (and the pom unchanged) Maven is not run at all.
ensure_libs() {
  local name="$1" pom version dir marker sum tmp t0
  pom="$STACK_SRC/$name-pom.xml"
  version="$(pom_property "$pom" "$name.version")"
  [[ -n "$version" ]] || { err "no <$name.version> in $pom"; return 1; }
  dir="$CACHE/$name-$version"
  marker="$dir/.complete"
  sum="$(sha256sum "$pom" | cut -d' ' -f1)"
  LIBS="$dir/libs"
  if [[ -f "$marker" && "$(cat "$marker")" == "$sum" && -d "$LIBS" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || { err "mvn not found (needed once to fetch $name $version jars)"; return 1; }
  say "fetching $name $version jars from Maven Central into $LIBS ..."
  t0="$(now)"
  mkdir -p "$dir" || return 1
  tmp="$dir/libs.tmp.$$"
  rm -rf "$tmp"
  if ! mvn -q -B -f "$pom" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$dir/mvn.log" 2>&1; then
    err "maven failed for $name $version; see $dir/mvn.log"
    tail -n 30 "$dir/mvn.log" >&2 || true
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$LIBS" && mv "$tmp" "$LIBS" && echo "$sum" >"$marker" || return 1
  say "fetched $name $version ($(find "$LIBS" -name "*.jar" | wc -l) jars) in $(since "$t0")"
}

# ----------------------------------------------------------------------------
# process launching

# launch SERVICE CMD... : run CMD detached (own session, no stdin, survives the
# calling shell), appending stdout+stderr to .stack/logs/SERVICE.log. The
# pidfile is written by the child itself right before it execs CMD, so the
# pid is exactly the service's pid.
launch() {
  local svc="$1"; shift
  local pf log i
  pf="$(pidfile "$svc")"
  log="$(logfile "$svc")"
  rm -f "$pf"
  printf '\n===== %s: starting %s =====\n' "$(date '+%F %T')" "$svc" >>"$log"
  # The child closes every inherited fd above 2 (lock fd, pipes of whoever
  # called us, e.g. a CI runner waiting for EOF) before exec'ing the service.
  # shellcheck disable=SC2016
  nohup setsid bash -c '
    for fd in $(ls /proc/$$/fd 2>/dev/null); do [[ $fd -gt 2 ]] && eval "exec $fd>&-"; done
    echo $$ >"$0"; exec "$@"' "$pf" "$@" </dev/null >>"$log" 2>&1 9>&- &
  for ((i = 0; i < 100; i++)); do
    [[ -s "$pf" ]] && return 0
    sleep 0.05
  done
  err "$svc: pidfile $pf was not written"
  return 1
}

# True when PORT can be bound for listening right now. A port in the ephemeral range (32768-60999)
# can be taken for a moment by a client socket, e.g. a client reconnecting to this very port while
# the service is down connects to itself (TCP simultaneous open); such a socket goes away again.
port_bindable() {
  "$PYTHON" - "$HOST" "$1" 2>/dev/null <<'PY'
import socket, sys
s = socket.socket()
# SO_REUSEADDR, as Redis, ZooKeeper and Kafka's NIO acceptor set it: a TIME-WAIT socket left by the
# stopped server does not block them, but a live socket bound to the port (a client that connected
# to itself on a port in the ephemeral range) does.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
PY
}

# Wait (up to 90 s) until every port of SERVICE can be bound.
wait_ports_bindable() {
  local svc="$1" port i
  for port in $(ports_of "$svc"); do
    for ((i = 0; i < 180; i++)); do
      port_bindable "$port" && break
      ((i == 0)) && say "$svc: port $port is held by a client socket for now; waiting"
      sleep 0.5
    done
  done
}

# Refuse to start if somebody else already listens on our port.
# A process that was just killed may still accept connections for a moment while its threads exit:
# a port is only "in use" when it still answers after a few seconds.
check_port_free() {
  local svc="$1" port i
  for port in $(ports_of "$svc"); do
    for ((i = 0; i < 20; i++)); do
      port_open "$port" || break
      sleep 0.25
    done
    if port_open "$port"; then
      err "$svc: port $HOST:$port is already in use by another process (not ours)."
      local base="${svc%%-*}"
      err "      Stop it, or pick other ports with FUSION_${base^^}_PORT=..."
      return 1
    fi
  done
}

start_redis() {
  command -v redis-server >/dev/null || install_redis || return 1
  mkdir -p "$DATA_DIR/redis" || return 1
  local aof=no
  [[ "${FUSION_REDIS_PERSIST:-0}" == 1 ]] && aof=yes
  launch redis redis-server \
    --port "$REDIS_PORT" --bind "$HOST" --protected-mode yes \
    --dir "$DATA_DIR/redis" --daemonize no --save "" --appendonly "$aof" \
    --logfile ""
}

install_redis() {
  say "redis-server not found: installing it with apt-get (Debian package redis-server) ..."
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || return 1
  $sudo apt-get install -y -qq redis-server >/dev/null || return 1
  command -v redis-server >/dev/null || { err "redis-server still missing after apt-get"; return 1; }
}

# The environment of the RabbitMQ node and of its CLI tools (rabbitmqctl): everything under .stack/, on
# loopback, on this stack's ports. RUNNING_UNDER_SYSTEMD makes rabbitmq-server exec the Erlang VM (with
# -noinput) instead of running it as a child of the script, so the pidfile names the broker itself.
rabbitmq_env() {
  printf '%s\n' \
    "RABBITMQ_NODENAME=$RABBITMQ_NODE" "RABBITMQ_NODE_IP_ADDRESS=$HOST" "RABBITMQ_NODE_PORT=$RABBITMQ_PORT" \
    "RABBITMQ_DIST_PORT=$RABBITMQ_DIST_PORT" "ERL_EPMD_PORT=$EPMD_PORT" "ERL_EPMD_ADDRESS=$HOST" \
    "RABBITMQ_CONF_ENV_FILE=$CONF_DIR/rabbitmq-env.conf" "RABBITMQ_CONFIG_FILE=$CONF_DIR/rabbitmq.conf" \
    "RABBITMQ_ENABLED_PLUGINS_FILE=$CONF_DIR/rabbitmq-plugins" "RABBITMQ_MNESIA_BASE=$DATA_DIR/rabbitmq" \
    "RABBITMQ_LOG_BASE=$LOG_DIR" "RABBITMQ_LOGS=-" "RABBITMQ_PID_FILE=$STATE/rabbitmq-node.pid" \
    "RUNNING_UNDER_SYSTEMD=true"
}

# The node runs as the calling user straight from Debian's scripts (/usr/lib/rabbitmq/bin), not through
# /usr/sbin/rabbitmq-server, which switches to the rabbitmq user and its system directories.
start_rabbitmq() {
  [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || install_rabbitmq || return 1
  mkdir -p "$DATA_DIR/rabbitmq" "$CONF_DIR" || return 1
  : >"$CONF_DIR/rabbitmq-env.conf"
  echo "[]." >"$CONF_DIR/rabbitmq-plugins"   # no plugin: the broker alone starts in a few seconds
  cat >"$CONF_DIR/rabbitmq.conf" <<EOF || return 1
# generated by stack/stack.sh -- edits are overwritten on every start
listeners.tcp.1 = $HOST:$RABBITMQ_PORT
# a test machine's disk may be nearly full: block publishers only below 100 MB free
disk_free_limit.absolute = 100MB
EOF
  local -a env
  mapfile -t env < <(rabbitmq_env)
  # No port mapper there yet: the node starts one, which `down` stops again (.stack/epmd-port names it).
  port_open "$EPMD_PORT" || echo "$EPMD_PORT" >"$STATE/epmd-port"
  # The VM's schedulers sleep when idle instead of spinning (a shared machine of a few cores).
  launch rabbitmq env "${env[@]}" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none" \
    /usr/lib/rabbitmq/bin/rabbitmq-server
}

install_rabbitmq() {
  say "rabbitmq-server not found: installing it with apt-get (Debian package rabbitmq-server) ..."
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || return 1
  $sudo apt-get install -y -qq rabbitmq-server >/dev/null || return 1
  [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || { err "rabbitmq-server still missing after apt-get"; return 1; }
}

# rabbitmqctl ARGS... : Debian's rabbitmqctl against this stack's node.
cmd_rabbitmqctl() {
  local -a env
  mapfile -t env < <(rabbitmq_env)
  env "${env[@]}" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBITMQ_NODE" "$@"
}

# The Erlang port mapper the stack's RabbitMQ node started (it outlives the node; .stack/epmd-port names its
# port): stopped once no node is registered with it. A mapper that was there before is left alone.
stop_epmd() {
  local port names
  port="$(cat "$STATE/epmd-port" 2>/dev/null)" || return 0
  command -v epmd >/dev/null || return 0
  names="$(ERL_EPMD_PORT="$port" timeout 5 epmd -names 2>/dev/null)" || { rm -f "$STATE/epmd-port"; return 0; }
  grep -q '^name ' <<<"$names" && return 0
  ERL_EPMD_PORT="$port" timeout 5 epmd -kill >/dev/null 2>&1 || true
  rm -f "$STATE/epmd-port"
}

start_zookeeper() {
  ensure_libs zookeeper || return 1
  mkdir -p "$DATA_DIR/zookeeper" "$CONF_DIR" || return 1
  cat >"$CONF_DIR/zoo.cfg" <<EOF || return 1
# generated by stack/stack.sh -- edits are overwritten on every start
tickTime=2000
initLimit=10
syncLimit=5
dataDir=$DATA_DIR/zookeeper
clientPort=$ZOOKEEPER_PORT
clientPortAddress=$HOST
maxClientCnxns=0
4lw.commands.whitelist=ruok,srvr,stat,mntr
admin.enableServer=false
autopurge.snapRetainCount=3
autopurge.purgeInterval=1
EOF
  launch zookeeper "$JAVA" -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Djava.awt.headless=true \
    -Dzookeeper.admin.enableServer=false \
    -Dzookeeper.4lw.commands.whitelist=ruok,srvr,stat,mntr \
    -Dorg.slf4j.simpleLogger.defaultLogLevel=info \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.dateTimeFormat="yyyy-MM-dd HH:mm:ss,SSS" \
    -Dorg.slf4j.simpleLogger.showShortLogName=true \
    -cp "$LIBS/*" org.apache.zookeeper.server.quorum.QuorumPeerMain "$CONF_DIR/zoo.cfg"
}

# Data dir of Kafka node N: each topology has its own (a KRaft log belongs to one quorum).
kafka_data() {
  if ((KAFKA_NODES == 1)); then echo "$DATA_DIR/kafka"; else echo "$DATA_DIR/kafka-${KAFKA_NODES}nodes/node-$1"; fi
}

# Replication of the cluster's own topics and the default of new ones: min(3, nodes) copies, and
# min.insync.replicas 2 where there are at least 3 (one broker may be down without stopping writes).
kafka_rf() { if ((KAFKA_NODES < 3)); then echo "$KAFKA_NODES"; else echo 3; fi; }
kafka_min_isr() { if (($(kafka_rf) >= 3)); then echo 2; else echo 1; fi; }

write_kafka_config() {  # write_kafka_config SERVICE
  local svc="$1" n voters="" i rf isr
  n="$(node_of "$svc")"
  for ((i = 1; i <= KAFKA_NODES; i++)); do voters+="${voters:+,}$i@$HOST:$(controller_port "$i")"; done
  rf="$(kafka_rf)"
  isr="$(kafka_min_isr)"
  cat >"$CONF_DIR/$svc.properties" <<EOF
# generated by stack/stack.sh -- edits are overwritten on every start
process.roles=broker,controller
node.id=$n
# static quorum of every node (the endpoints are not baked into the formatted
# storage, so the controller ports may change between runs)
controller.quorum.voters=$voters
listeners=PLAINTEXT://$HOST:$(kafka_port "$n"),CONTROLLER://$HOST:$(controller_port "$n"),SASL_PLAINTEXT://$HOST:$(sasl_port "$n")
advertised.listeners=PLAINTEXT://$HOST:$(kafka_port "$n"),SASL_PLAINTEXT://$HOST:$(sasl_port "$n")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT

# Authentication and ACLs, enforced on the SASL_PLAINTEXT listener only: clients there log in with
# SCRAM-SHA-256 (users are created with the admin API) and need ACLs.  The PLAINTEXT listener and
# the controller connect as User:ANONYMOUS, a super user, so everything else works as before.
sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
allow.everyone.if.no.acl.found=false

log.dirs=$(kafka_data "$n")
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
auto.create.topics.enable=false
delete.topic.enable=true
unclean.leader.election.enable=false

offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr

group.initial.rebalance.delay.ms=0
group.coordinator.rebalance.protocols=classic,consumer

log.segment.bytes=16777216
log.retention.hours=24
log.retention.check.interval.ms=10000

num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
}

# Kafka cluster ids are 16 random bytes, base64url without padding (22 chars),
# and must not start with '-'.
new_cluster_id() {
  local id
  while :; do
    id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && { echo "$id"; return; }
  done
}

# The cluster id every node of this topology is formatted with (made once, kept beside the data).
cluster_id() {
  local f
  if ((KAFKA_NODES == 1)); then new_cluster_id; return; fi
  f="$DATA_DIR/kafka-${KAFKA_NODES}nodes/cluster-id"
  mkdir -p "$(dirname "$f")"
  [[ -s "$f" ]] || new_cluster_id >"$f"
  cat "$f"
}

start_kafka() {  # start_kafka SERVICE
  local svc="$1" n data
  n="$(node_of "$svc")"
  data="$(kafka_data "$n")"
  ensure_libs kafka || return 1
  mkdir -p "$data" "$CONF_DIR" || return 1
  write_kafka_config "$svc" || return 1
  local jvm=(-Djava.awt.headless=true
             -Dlog4j2.configurationFile="$STACK_SRC/kafka-log4j2.properties"
             -Dkafka.logs.dir="$LOG_DIR")
  if [[ ! -f "$data/meta.properties" ]]; then
    local t0 cid
    t0="$(now)"
    cid="$(cluster_id)"
    say "$svc: formatting storage (cluster id $cid, node $n of $KAFKA_NODES)"
    if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 "${jvm[@]}" -cp "$LIBS/*" kafka.tools.StorageTool \
          format --cluster-id "$cid" --config "$CONF_DIR/$svc.properties" --ignore-formatted \
          >>"$(logfile "$svc")" 2>&1; then
      err "$svc: storage format failed:"
      tail -n 40 "$(logfile "$svc")" >&2
      return 1
    fi
    say "$svc: storage formatted in $(since "$t0")"
  fi
  # shellcheck disable=SC2086
  launch "$svc" "$JAVA" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:+UseStringDeduplication \
    "${jvm[@]}" -cp "$LIBS/*" kafka.Kafka "$CONF_DIR/$svc.properties"
}

start_service() {
  case "$1" in kafka*) start_kafka "$1" ;; *) "start_$1" ;; esac
}

# wait_ready SERVICE T0 : poll until ready; on death/timeout print log tail, fail.
wait_ready() {
  local svc="$1" t0="$2" deadline pid
  deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    if ! pid="$(service_pid "$svc")"; then
      err "$svc exited during startup; last 40 lines of $(logfile "$svc"):"
      tail -n 40 "$(logfile "$svc")" >&2 || true
      return 1
    fi
    if service_ready "$svc"; then
      say "$svc ready (pid $pid, $(endpoint "$svc")) in $(since "$t0")"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      err "$svc not ready after ${READY_TIMEOUT}s; last 40 lines of $(logfile "$svc"):"
      tail -n 40 "$(logfile "$svc")" >&2 || true
      return 1
    fi
    sleep 0.3
  done
}

write_env() {
  local tmp="$ENV_FILE.tmp.$$"
  cat >"$tmp" <<EOF
FUSION_KAFKA_BOOTSTRAP_SERVERS=$(kafka_list kafka_port)
CELERY_BROKER_URL=$(broker_url)
CELERY_RESULT_BACKEND=redis://$HOST:$REDIS_PORT/1
FUSION_ZOOKEEPER_HOSTS=$HOST:$ZOOKEEPER_PORT
FUSION_KAFKA_SASL_BOOTSTRAP_SERVERS=$(kafka_list sasl_port)
FUSION_KAFKA_NODES=$KAFKA_NODES
FUSION_KAFKA_PORT=$KAFKA_PORT
FUSION_KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT
FUSION_KAFKA_SASL_PORT=$KAFKA_SASL_PORT
FUSION_REDIS_PORT=$REDIS_PORT
FUSION_ZOOKEEPER_PORT=$ZOOKEEPER_PORT
FUSION_BROKER=$BROKER
FUSION_RABBITMQ_PORT=$RABBITMQ_PORT
FUSION_RABBITMQ_DIST_PORT=$RABBITMQ_DIST_PORT
FUSION_EPMD_PORT=$EPMD_PORT
EOF
  mv "$tmp" "$ENV_FILE"
}

# The Celery broker's URL: RabbitMQ's default vhost, or Redis's database 0.
broker_url() {
  if [[ "$BROKER" == rabbitmq ]]; then echo "amqp://guest:guest@$HOST:$RABBITMQ_PORT//"
  else echo "redis://$HOST:$REDIS_PORT/0"; fi
}

init_dirs() { mkdir -p "$PID_DIR" "$LOG_DIR" "$DATA_DIR" "$CONF_DIR"; }

# The Kafka services with a pidfile (whatever topology started them).
running_kafka() {
  local f
  for f in "$PID_DIR"/kafka.pid "$PID_DIR"/kafka-*.pid; do
    [[ -e "$f" ]] && basename "$f" .pid
  done
}

# Refuse to mix topologies: Kafka nodes of another FUSION_KAFKA_NODES are still running.
check_topology() {
  local was svc
  was="$(cat "$NODES_FILE" 2>/dev/null || true)"
  [[ -z "$was" || "$was" == "$KAFKA_NODES" ]] && return 0
  for svc in $(running_kafka); do
    if service_pid "$svc" >/dev/null; then
      err "a Kafka of $was node(s) is running, this command asks for $KAFKA_NODES (FUSION_KAFKA_NODES):"
      err "run \`stack/stack.sh down\` (make down) first"
      exit 2
    fi
  done
}

# Serialize up/down/start/stop (e.g. two `make test` at once). fd 9 is closed
# for the launched services (see launch) so they never hold the lock.
take_lock() {
  init_dirs
  if command -v flock >/dev/null; then
    exec 9>"$STATE/.lock"
    flock -w 300 9 || { err "could not take $STATE/.lock"; exit 1; }
  fi
}

# start_services SERVICE... : start the ones not running (in parallel), wait for all.
start_services() {
  local svc pid t_all t0 failed=0
  local -a started=() t_start=()
  local -A log_lines=()
  t_all="$(now)"
  # Fetch jars first (sequential Maven runs; no-op when cached).
  for svc in "$@"; do
    case "$svc" in kafka*|zookeeper) service_pid "$svc" >/dev/null || ensure_libs "${svc%%-*}" ;; esac
  done
  for svc in "$@"; do
    if pid="$(service_pid "$svc")"; then
      if service_ready "$svc"; then
        say "$svc already running (pid $pid, $(endpoint "$svc"))"
      else
        say "$svc running (pid $pid) but not answering yet; waiting"
        started+=("$svc"); t_start+=("$(now)")
      fi
      continue
    fi
    rm -f "$(pidfile "$svc")"
    check_port_free "$svc" || { failed=1; continue; }
    wait_ports_bindable "$svc"
    t0="$(now)"
    log_lines["$svc"]="$(wc -l 2>/dev/null <"$(logfile "$svc")" || echo 0)"
    start_service "$svc" || { err "$svc failed to start"; failed=1; continue; }
    say "$svc started (pid $(head -n1 "$(pidfile "$svc")")), waiting until ready ..."
    started+=("$svc"); t_start+=("$t0")
  done
  local i try svc_i
  for i in "${!started[@]}"; do
    svc_i="${started[$i]}"
    for ((try = 1; ; try++)); do
      wait_ready "$svc_i" "${t_start[$i]}" && break
      # Lost the race for a port to a passing client socket (see port_bindable): start it again.
      if ((try < 5)) && tail -n +"$((${log_lines[$svc_i]:-0} + 1))" "$(logfile "$svc_i")" 2>/dev/null \
           | grep -q "Address already in use"; then
        say "$svc_i could not bind its port (taken by a client socket for a moment); starting it again"
        log_lines["$svc_i"]="$(wc -l <"$(logfile "$svc_i")")"
        wait_ports_bindable "$svc_i"
        start_service "$svc_i" && continue
      fi
      failed=1
      break
    done
  done
  write_env
  if ((failed)); then
    err "stack not fully up after $(since "$t_all")"
    return 1
  fi
  say "ready in $(since "$t_all"); environment in ${ENV_FILE#"$ROOT"/}"
}

stop_service() {
  local svc="$1" pid i
  if ! pid="$(service_pid "$svc")"; then
    rm -f "$(pidfile "$svc")"
    say "$svc not running"
    return 0
  fi
  say "stopping $svc (pid $pid) ..."
  local t0
  t0="$(now)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pid_alive "$svc" "$pid" || break
    sleep 0.1
  done
  if pid_alive "$svc" "$pid"; then
    say "$svc (pid $pid) still alive after ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do pid_alive "$svc" "$pid" || break; sleep 0.1; done
  fi
  rm -f "$(pidfile "$svc")"
  say "$svc stopped in $(since "$t0")"
}

# stop_services SERVICE... : the Kafka nodes among them together (the last node of a cluster alone cannot
# finish its controlled shutdown without a quorum), then the others in the order given.
stop_services() {
  local svc
  local -a nodes=() others=() waits=()
  for svc in "$@"; do
    svc="$(canonical "$svc")"
    if is_kafka "$svc"; then nodes+=("$svc"); else others+=("$svc"); fi
  done
  for svc in "${nodes[@]}"; do stop_service "$svc" & waits+=($!); done
  ((${#waits[@]} == 0)) || wait "${waits[@]}"
  for svc in "${others[@]}"; do stop_service "$svc"; done
}

status() {
  local svc pid all_up=0 state
  local -a which=("$@")
  ((${#which[@]})) || which=("${SERVICES[@]}")
  for svc in "${which[@]}"; do
    valid_service "$svc" || { err "unknown service '$svc' (${SERVICES[*]})"; return 2; }
    svc="$(canonical "$svc")"
    if pid="$(service_pid "$svc")"; then
      if service_ready "$svc"; then state=running; else state=unhealthy; all_up=3; fi
    else
      state=stopped; pid=-; all_up=3
    fi
    printf '%-10s %-10s pid=%-8s %s\n' "$svc" "$state" "$pid" "$(endpoint "$svc")"
  done
  return "$all_up"
}

usage() {
  sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

need_service() {
  valid_service "${1:-}" || { err "expected a service name: ${SERVICES[*]}"; usage >&2; exit 2; }
}

# ----------------------------------------------------------------------------
# command-line tools for the examples (not services)

# cli: Kafka's command-line tools as .stack/bin/kafka-topics.sh, kafka-console-producer.sh and
# kafka-console-consumer.sh (java -cp the kafka-tools jars, fetched once into the cache), and kcat (the Debian
# package, with apt-get) when missing. Prints the bin folder.
cmd_cli() {
  ensure_libs kafka-cli || return 1
  local bin="$STATE/bin" tool class
  mkdir -p "$bin" || return 1
  for tool in kafka-topics.sh:org.apache.kafka.tools.TopicCommand \
              kafka-console-producer.sh:org.apache.kafka.tools.ConsoleProducer \
              kafka-console-consumer.sh:org.apache.kafka.tools.consumer.ConsoleConsumer; do
    class="${tool#*:}"
    printf '#!/bin/sh\nexec java -cp "%s/*" %s "$@"\n' "$LIBS" "$class" >"$bin/${tool%%:*}" || return 1
    chmod +x "$bin/${tool%%:*}" || return 1
  done
  command -v kcat >/dev/null || install_kcat || return 1
  echo "$bin"
}

install_kcat() {
  say "kcat not found: installing it with apt-get (Debian package kcat) ..." >&2
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >&2 || return 1
  $sudo apt-get install -y -qq kcat >/dev/null || return 1
  command -v kcat >/dev/null || { err "kcat still missing after apt-get"; return 1; }
}

# ----------------------------------------------------------------------------

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    up)
      take_lock
      check_topology
      echo "$KAFKA_NODES" >"$NODES_FILE"
      echo "$BROKER" >"$BROKER_FILE"
      start_services "${SERVICES[@]}"
      ;;
    down)
      take_lock
      # the Kafka nodes first (every one with a pidfile), RabbitMQ whatever the broker, zookeeper last
      # shellcheck disable=SC2046
      stop_services $(running_kafka) rabbitmq redis zookeeper
      stop_epmd
      rm -f "$NODES_FILE" "$BROKER_FILE"
      ;;
    services)
      printf '%s\n' "${SERVICES[@]}" ;;
    env)
      take_lock; echo "$BROKER" >"$BROKER_FILE"; write_env ;;
    rabbitmqctl)
      cmd_rabbitmqctl "$@" ;;
    cli)
      cmd_cli ;;
    status)
      init_dirs
      status "$@"
      ;;
    start)
      need_service "${1:-}"; take_lock; check_topology; start_services "$(canonical "$1")" ;;
    stop)
      local svc
      for svc in "${@:-}"; do need_service "$svc"; done
      take_lock; stop_services "$@" ;;
    restart)
      need_service "${1:-}"; take_lock; check_topology
      stop_service "$(canonical "$1")"; start_services "$(canonical "$1")" ;;
    -h|--help|help)
      usage ;;
    *)
      usage >&2; exit 2 ;;
  esac
}

main "$@"
