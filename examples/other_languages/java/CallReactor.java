// Call a fusion-celery reactor from Java with the plain Kafka client (org.apache.kafka:kafka-clients).
//
//   java -cp "kafka-libs/*" CallReactor.java localhost:9092 math '[1, 2, 3]'     -> prints 4
//
// The wire protocol (docs/reference/protocol.md): make a return topic whose name starts with
// "fusion.rt." (the reactors' default reply allow-list), start reading it, send
// {"data": ..., "return-topic": ..., "id": ..., "deadline": ...} to the reactor's topic, read the
// single reply, and delete the return topic.
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class CallReactor {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], topic = args[1], dataJson = args[2];   // data: any JSON text
        long timeoutMs = 60_000;
        String id = UUID.randomUUID().toString();
        // fusion.rt.<creation time in ms>.<unique part>: the reaper reads the time from the name.
        String returnTopic = "fusion.rt." + System.currentTimeMillis() + "." + id.replace("-", "");

        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        try (Admin admin = Admin.create(props)) {
            admin.createTopics(List.of(new NewTopic(returnTopic, 1, (short) -1)
                    .configs(Map.of("retention.ms", "3600000")))).all().get();
            try (KafkaConsumer<String, String> consumer =
                         new KafkaConsumer<>(props, new StringDeserializer(), new StringDeserializer());
                 KafkaProducer<String, String> producer =
                         new KafkaProducer<>(props, new StringSerializer(), new StringSerializer())) {
                // Read the return topic from its beginning *before* sending: no reply can be missed.
                TopicPartition tp = new TopicPartition(returnTopic, 0);
                consumer.assign(List.of(tp));
                consumer.seekToBeginning(List.of(tp));

                long deadline = System.currentTimeMillis() + timeoutMs;
                String request = "{\"data\":" + dataJson + ",\"return-topic\":\"" + returnTopic
                        + "\",\"id\":\"" + id + "\",\"deadline\":" + deadline + "}";
                producer.send(new ProducerRecord<>(topic, topic, request)).get();

                while (System.currentTimeMillis() < deadline) {
                    for (ConsumerRecord<String, String> reply : consumer.poll(Duration.ofMillis(500))) {
                        Header status = reply.headers().lastHeader("fusion-status");
                        boolean error = status != null && new String(status.value()).equals("error");
                        if (error) {   // body: {"error": {"type": ..., "message": ...}}
                            System.err.println("error reply: " + reply.value());
                            System.exit(1);
                        }
                        System.out.println(reply.value());   // the JSON of the result itself
                        return;
                    }
                }
                System.err.println("no reply within " + timeoutMs + " ms");
                System.exit(2);
            } finally {
                admin.deleteTopics(List.of(returnTopic)).all().get();
            }
        }
    }
}
