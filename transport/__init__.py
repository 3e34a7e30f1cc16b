"""The one Kafka transport: connection model, client factories, topics, publisher, admin,
range reader, consumer-group member and the local development broker. The only package
that imports kafka-python or aiokafka."""
