"""The one Kafka transport: connection model, client factories, topics, publisher, admin,
range reader and the local development broker. The only package that imports kafka-python
(faust, in the worker's wiring, is fed by `clients.stream_broker`)."""
