// Call a fusion-celery reactor from Go with github.com/segmentio/kafka-go (pure Go, no Celery).
//
//	go run . localhost:9092 math '[1, 2, 3]'     -> prints 4
//
// The wire protocol (docs/reference/protocol.md): make a return topic whose name starts with
// "fusion.rt.", read it from the beginning, send {"data", "return-topic", "id", "deadline"} to the
// reactor's topic, read the one reply (header fusion-status: ok | error), delete the return topic.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/segmentio/kafka-go"
)

type request struct {
	Data        json.RawMessage `json:"data"`
	ReturnTopic string          `json:"return-topic"`
	ID          string          `json:"id"`
	Deadline    int64           `json:"deadline"` // epoch milliseconds
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: go run . BOOTSTRAP TOPIC DATA_JSON")
		os.Exit(2)
	}
	result, err := call(os.Args[1], os.Args[2], json.RawMessage(os.Args[3]), 60*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(string(result)) // the JSON of the result itself
}

// call sends data to the reactor on topic and returns its reply (or the error reply as an error).
func call(bootstrap, topic string, data json.RawMessage, timeout time.Duration) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	now := time.Now()
	id := strconv.FormatInt(now.UnixNano(), 36)
	// fusion.rt.<creation time in ms>.<unique part>: the reaper reads the time from the name.
	returnTopic := fmt.Sprintf("fusion.rt.%d.go%s", now.UnixMilli(), id)

	// Topics are created and deleted through the controller broker.
	conn, err := kafka.Dial("tcp", bootstrap)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	controller, err := conn.Controller()
	if err != nil {
		return nil, err
	}
	ctrl, err := kafka.Dial("tcp", net.JoinHostPort(controller.Host, strconv.Itoa(controller.Port)))
	if err != nil {
		return nil, err
	}
	defer ctrl.Close()
	if err := ctrl.CreateTopics(kafka.TopicConfig{Topic: returnTopic, NumPartitions: 1, ReplicationFactor: 1}); err != nil {
		return nil, err
	}
	defer ctrl.DeleteTopics(returnTopic)

	// Read the return topic from its beginning (no consumer group: one partition, one reader).
	reader := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{bootstrap}, Topic: returnTopic, Partition: 0})
	defer reader.Close()
	if err := reader.SetOffset(kafka.FirstOffset); err != nil {
		return nil, err
	}

	body, err := json.Marshal(request{Data: data, ReturnTopic: returnTopic, ID: id,
		Deadline: now.Add(timeout).UnixMilli()})
	if err != nil {
		return nil, err
	}
	writer := &kafka.Writer{Addr: kafka.TCP(bootstrap), RequiredAcks: kafka.RequireAll}
	defer writer.Close()
	if err := writer.WriteMessages(ctx, kafka.Message{Topic: topic, Key: []byte(topic), Value: body}); err != nil {
		return nil, err
	}

	reply, err := reader.ReadMessage(ctx)
	if err != nil {
		return nil, fmt.Errorf("no reply from %s: %w", topic, err)
	}
	for _, h := range reply.Headers {
		if h.Key == "fusion-status" && string(h.Value) == "error" { // body: {"error": {"type", "message"}}
			return nil, fmt.Errorf("error reply: %s", reply.Value)
		}
	}
	return json.RawMessage(strings.TrimSpace(string(reply.Value))), nil
}
