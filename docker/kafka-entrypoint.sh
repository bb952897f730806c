#!/bin/sh
# Single-node KRaft broker+controller for the compose network (same settings as
# scripts/services: acks=all durable with one replica, small thread pools).
set -euf  # -f: the classpath wildcard is for java, not the shell
mkdir -p /data/kafka
cat > /tmp/server.properties <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:9093
listeners=PLAINTEXT://0.0.0.0:9092,CONTROLLER://127.0.0.1:9093
advertised.listeners=PLAINTEXT://${KAFKA_ADVERTISED_HOST:-kafka}:9092
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=/data/kafka
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
unclean.leader.election.enable=false
auto.create.topics.enable=true
num.partitions=1
num.network.threads=2
num.io.threads=4
offsets.topic.num.partitions=8
group.initial.rebalance.delay.ms=0
PROPS
cat > /tmp/log4j2.properties <<PROPS
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
PROPS
JAVA="java $KAFKA_HEAP -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile=/tmp/log4j2.properties -cp /opt/kafka/libs/*"
if [ ! -f /data/kafka/meta.properties ]; then
  $JAVA kafka.tools.StorageTool format --ignore-formatted -t "${KAFKA_CLUSTER_ID:-cG9jbmV0LWNvbXBvc2UxMg}" -c /tmp/server.properties
fi
exec $JAVA kafka.Kafka /tmp/server.properties
