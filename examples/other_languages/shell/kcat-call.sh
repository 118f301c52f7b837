#!/bin/sh
# Call a fusion-celery reactor with kcat (Debian package kcat).
#
#   sh kcat-call.sh localhost:9092 math '[1, 2, 3]'
#   -> fusion-status=ok,fusion-id=kcat-12345	4
#
# kcat produces and consumes but cannot create or delete topics: the return topic is made and removed with
# Kafka's kafka-topics.sh (bin/ of the Kafka distribution; `stack/stack.sh cli` puts one in .stack/bin and
# installs kcat where it is missing). Name another command with the same arguments in KAFKA_TOPICS.
set -eu
BOOTSTRAP=${1:-localhost:9092}
TOPIC=${2:-math}
DATA=${3:-'[1, 2, 3]'}
TOPICS=${KAFKA_TOPICS:-kafka-topics.sh}
ID="kcat-$$"
# fusion.rt.<creation ms>.<deadline ms>.<unique>: reactors reply only to topics with the prefix fusion.rt.,
# and the reaper leaves the topic alone until a grace has passed after both times.  (GNU date.)
NOW=$(date +%s%3N)
DEADLINE=$((NOW + 60000))
RT="fusion.rt.$NOW.$DEADLINE.kcat$$$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

$TOPICS --bootstrap-server "$BOOTSTRAP" --create --topic "$RT" --partitions 1 >/dev/null
trap '$TOPICS --bootstrap-server "$BOOTSTRAP" --delete --topic "$RT" >/dev/null' EXIT
printf '{"data": %s, "return-topic": "%s", "id": "%s", "deadline": %s}\n' "$DATA" "$RT" "$ID" "$DEADLINE" |
  kcat -P -b "$BOOTSTRAP" -t "$TOPIC" -k "$ID"
# One record from the start of partition 0, its headers before its value; give up after 60 s.
timeout 60 kcat -C -b "$BOOTSTRAP" -t "$RT" -p 0 -o beginning -c 1 -f '%h\t%s\n'
