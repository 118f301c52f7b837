// A dependency service in Go for fusion-celery reactors, with github.com/segmentio/kafka-go (pure Go, no
// Celery): it serves "subtract" (the first number minus the others) on a topic of its own.
//
//	go run . localhost:9092 math-go.subtract
//
// The wire protocol (docs/reference/protocol.md): read requests {"data", "return-topic", "id", ...} in a
// consumer group, answer each on its return topic with the result as JSON, the header fusion-status
// (ok | error) and the request's id in the header fusion-id (which every reply channel accepts, and the
// shared one requires). An offset is committed only after its answer was acknowledged, so a crash
// answers a request again rather than never; the fusion-id header lets the caller drop the second answer.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/segmentio/kafka-go"
)

type request struct {
	Data        json.RawMessage `json:"data"`
	ReturnTopic string          `json:"return-topic"`
	ID          json.RawMessage `json:"id"` // a string or an integer
}

type failure struct {
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
}

// subtract is the service's work: the first number minus all the others.
func subtract(data json.RawMessage) (json.RawMessage, error) {
	var numbers []float64
	if err := json.Unmarshal(data, &numbers); err != nil || len(numbers) == 0 {
		return nil, fmt.Errorf("expected a non-empty list of numbers, got %s", data)
	}
	result := numbers[0]
	for _, n := range numbers[1:] {
		result -= n
	}
	return json.Marshal(result)
}

// answer builds the reply record of one request.
func answer(req request) kafka.Message {
	headers := []kafka.Header{}
	if len(req.ID) > 0 && string(req.ID) != "null" {
		var id string
		if err := json.Unmarshal(req.ID, &id); err != nil {
			id = string(req.ID) // an integer id, as its digits
		}
		headers = append(headers, kafka.Header{Key: "fusion-id", Value: []byte(id)})
	}
	value, err := subtract(req.Data)
	status := "ok"
	if err != nil {
		var f failure
		f.Error.Type, f.Error.Message = "ValueError", err.Error()
		value, _ = json.Marshal(f)
		status = "error"
	}
	headers = append(headers, kafka.Header{Key: "fusion-status", Value: []byte(status)})
	return kafka.Message{Topic: req.ReturnTopic, Value: value, Headers: headers}
}

// reply writes an answer, trying again for up to 30 s while Kafka says its topic does not exist: a return
// topic the caller has just created may not be in this client's metadata yet (kafka-go looks topics up
// again every 6 s).
func reply(ctx context.Context, writer *kafka.Writer, msg kafka.Message) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := writer.WriteMessages(ctx, msg)
		if err == nil || !unknownTopic(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// unknownTopic says whether err is Kafka's "Unknown Topic Or Partition", alone or as a message's error.
func unknownTopic(err error) bool {
	var each kafka.WriteErrors
	if errors.As(err, &each) {
		for _, e := range each {
			if e != nil && errors.Is(e, kafka.UnknownTopicOrPartition) {
				return true
			}
		}
		return false
	}
	return errors.Is(err, kafka.UnknownTopicOrPartition)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: go run . BOOTSTRAP TOPIC")
		os.Exit(2)
	}
	brokers, topic := strings.Split(os.Args[1], ","), os.Args[2]
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	reader := kafka.NewReader(kafka.ReaderConfig{Brokers: brokers, GroupID: "go-service." + topic, Topic: topic})
	defer reader.Close()
	writer := &kafka.Writer{Addr: kafka.TCP(brokers...), RequiredAcks: kafka.RequireAll}
	defer writer.Close()
	log.Printf("serving %s", topic)
	for {
		msg, err := reader.FetchMessage(ctx)
		if err != nil {
			if ctx.Err() != nil {
				log.Printf("stopped")
				return
			}
			log.Fatalf("fetch: %v", err)
		}
		var req request
		if err := json.Unmarshal(msg.Value, &req); err != nil || req.ReturnTopic == "" {
			log.Printf("skipped a record that is not a request (offset %d): %s", msg.Offset, msg.Value)
		} else if err := reply(ctx, writer, answer(req)); err != nil {
			log.Fatalf("answer to %s: %v", req.ReturnTopic, err)
		}
		if err := reader.CommitMessages(ctx, msg); err != nil {
			log.Fatalf("commit: %v", err)
		}
	}
}
