#!/bin/sh
# Call a fusion-celery reactor with nothing but Kafka's command-line tools (bin/ of the Kafka
# distribution, or /opt/kafka/bin in the apache/kafka image).
#
#   sh call.sh localhost:9092 math '[1, 2, 3]'
#   -> fusion-status:ok,fusion-id:sh-12345,fusion-run-id:<the run's task id>	4
set -eu
BOOTSTRAP=${1:-localhost:9092}
TOPIC=${2:-math}
DATA=${3:-'[1, 2, 3]'}
# fusion.rt.<creation time in ms>.<unique part>: the reactors reply only to topics with the
# prefix fusion.rt., and the reaper reads the creation time from the name.  (GNU date.)
RT="fusion.rt.$(date +%s%3N).sh$$"

kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --create --topic "$RT" --partitions 1
printf '{"data": %s, "return-topic": "%s", "id": "sh-%s"}\n' "$DATA" "$RT" "$$" |
  kafka-console-producer.sh --bootstrap-server "$BOOTSTRAP" --topic "$TOPIC"
kafka-console-consumer.sh --bootstrap-server "$BOOTSTRAP" --topic "$RT" --from-beginning \
  --max-messages 1 --timeout-ms 60000 --property print.headers=true
kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --delete --topic "$RT"
