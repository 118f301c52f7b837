package fusion.example;

import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.kafka.annotation.EnableKafka;
import org.springframework.kafka.annotation.KafkaListener;
import org.springframework.kafka.config.ConcurrentKafkaListenerContainerFactory;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.core.DefaultKafkaProducerFactory;
import org.springframework.kafka.core.KafkaTemplate;
import org.springframework.kafka.listener.ContainerProperties;
import org.springframework.kafka.listener.KafkaMessageListenerContainer;
import org.springframework.kafka.requestreply.ReplyingKafkaTemplate;
import org.springframework.kafka.requestreply.RequestReplyFuture;
import org.springframework.kafka.support.TopicPartitionOffset;
import org.springframework.messaging.handler.annotation.SendTo;

/**
 * Spring Kafka's request/reply against fusion-celery.
 *
 * <pre>
 * caller  SERVERS TOPIC DATA REPLY_TOPIC   a ReplyingKafkaTemplate sends DATA (JSON) to the reactor TOPIC and
 *                                          prints the answer; replies come to partition 1 of REPLY_TOPIC
 *                                          (made here with two partitions, deleted afterwards)
 * service SERVERS TOPIC                    a @KafkaListener + @SendTo on TOPIC answers "subtract": the first
 *                                          number minus the others (until stopped)
 * </pre>
 *
 * Spring puts the reply topic in the header kafka_replyTopic, the partition in kafka_replyPartition and a
 * correlation id (16 random bytes) in kafka_correlationId; a fusion reactor answers there and echoes the id.
 */
public final class Main {

    public static void main(String[] args) throws Exception {
        if (args.length == 5 && args[0].equals("caller")) {
            System.exit(call(args[1], args[2], args[3], args[4]));
        } else if (args.length == 3 && args[0].equals("service")) {
            serve(args[1], args[2]);
        } else {
            System.err.println("usage: caller SERVERS TOPIC DATA REPLY_TOPIC | service SERVERS TOPIC");
            System.exit(2);
        }
    }

    // -- the caller ---------------------------------------------------------------------------------------
    static int call(String servers, String topic, String data, String replyTopic) throws Exception {
        try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, servers))) {
            admin.createTopics(List.of(new NewTopic(replyTopic, 2, (short) 1))).all().get(30, TimeUnit.SECONDS);
            try {
                return callWith(servers, topic, data, replyTopic);
            } finally {
                admin.deleteTopics(List.of(replyTopic)).all().get(30, TimeUnit.SECONDS);
            }
        }
    }

    static int callWith(String servers, String topic, String data, String replyTopic) throws Exception {
        var producers = new DefaultKafkaProducerFactory<String, String>(Map.of(
                ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, servers,
                ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class,
                ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class));
        var consumers = new DefaultKafkaConsumerFactory<String, String>(Map.of(
                ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, servers,
                ConsumerConfig.GROUP_ID_CONFIG, "spring-caller-" + UUID.randomUUID(),
                ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest",
                ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class,
                ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class));
        // Listening to one given partition makes the template send kafka_replyPartition as well.
        var replies = new KafkaMessageListenerContainer<>(consumers,
                new ContainerProperties(new TopicPartitionOffset(replyTopic, 1)));
        var template = new ReplyingKafkaTemplate<>(producers, replies);
        template.setDefaultReplyTimeout(Duration.ofSeconds(60));
        template.start();
        try {
            if (!template.waitForAssignment(Duration.ofSeconds(30))) {
                System.err.println("the reply container was not assigned " + replyTopic + "[1]");
                return 1;
            }
            RequestReplyFuture<String, String, String> future =
                    template.sendAndReceive(new ProducerRecord<>(topic, data));
            ConsumerRecord<String, String> reply = future.get(60, TimeUnit.SECONDS);
            var status = reply.headers().lastHeader("fusion-status");
            if (status != null && new String(status.value()).equals("error")) {
                System.err.println("error: " + reply.value());
                return 1;
            }
            System.out.println(reply.value());
            return 0;
        } finally {
            template.stop();
            producers.destroy();
        }
    }

    // -- the service --------------------------------------------------------------------------------------
    static void serve(String servers, String topic) throws Exception {
        System.setProperty("fusion.servers", servers);
        System.setProperty("fusion.topic", topic);
        var context = new AnnotationConfigApplicationContext(ServiceConfig.class);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            context.close();
            System.out.println("spring service: stopped");
            System.out.flush();
        }));
        System.out.println("spring service: serving " + topic);
        System.out.flush();
        Thread.currentThread().join();
    }

    @Configuration
    @EnableKafka
    public static class ServiceConfig {
        private final String servers = System.getProperty("fusion.servers");

        @Bean
        public KafkaTemplate<String, String> replyTemplate() {
            return new KafkaTemplate<>(new DefaultKafkaProducerFactory<>(Map.of(
                    ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, servers,
                    ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class,
                    ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class)));
        }

        @Bean
        public ConcurrentKafkaListenerContainerFactory<String, String> kafkaListenerContainerFactory(
                KafkaTemplate<String, String> replyTemplate) {
            var factory = new ConcurrentKafkaListenerContainerFactory<String, String>();
            factory.setConsumerFactory(new DefaultKafkaConsumerFactory<>(Map.of(
                    ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, servers,
                    ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest",
                    ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class,
                    ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class)));
            factory.setReplyTemplate(replyTemplate);  // @SendTo answers through it
            return factory;
        }

        @Bean
        public Subtract subtract() {
            return new Subtract();
        }
    }

    /** Answers each request on the topic named by kafka_replyTopic, echoing kafka_correlationId (Spring does). */
    public static class Subtract {
        @KafkaListener(topics = "#{systemProperties['fusion.topic']}", groupId = "#{systemProperties['fusion.topic']}")
        @SendTo
        public String subtract(String data) {
            String body = data.trim();
            if (!body.startsWith("[") || !body.endsWith("]") || body.length() == 2) {
                return "{\"error\":{\"type\":\"ValueError\",\"message\":\"expected a non-empty list of numbers\"}}";
            }
            try {
                String[] parts = body.substring(1, body.length() - 1).split(",");
                double result = Double.parseDouble(parts[0].trim());
                for (int i = 1; i < parts.length; i++) {
                    result -= Double.parseDouble(parts[i].trim());
                }
                return result == Math.rint(result) ? Long.toString((long) result) : Double.toString(result);
            } catch (NumberFormatException e) {
                return "{\"error\":{\"type\":\"ValueError\",\"message\":\"expected a non-empty list of numbers\"}}";
            }
        }
    }
}
