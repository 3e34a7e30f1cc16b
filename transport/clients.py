"""Factories of every Kafka client the project uses; the only place that constructs them.

Each takes the one `KafkaConnection` and adds what its role needs. Driver errors met while
connecting are translated here into the project's taxonomy: a cluster that does not answer
is transient, a refused authentication or certificate is a configuration error.

The clients' DEBUG lines print whole requests and records (keys, values, headers: personal
data); every factory keeps them out of the logs (`quiet_client_debug`).
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError

from schemas.errors import ConfigurationError, TransientError
from transport.config import KafkaConnection


def translate(error: Exception, action: str) -> Exception:
    """A kafka-python error as one of the project's families."""
    name = type(error).__name__
    if "Authentication" in name or "Authorization" in name or "SSL" in name:
        return ConfigurationError(f"Kafka refused {action}: {name}: {error}")
    if isinstance(error, KafkaConnectionError):
        return TransientError(f"no Kafka broker answered while trying to {action}")
    return TransientError(f"Kafka error while trying to {action}: {name}")


CLIENT_LOGGERS = ("kafka", "aiokafka")


def quiet_client_debug() -> None:
    """Cap the Kafka clients' loggers at INFO, whatever the root logger's level: at DEBUG
    kafka-python logs every record it sends (`Sending (key=… value=… headers=…)`) and every
    request's bytes. Never below the root's level (a WARNING root stays quiet about the
    clients' INFO lines). A level someone set on these loggers on purpose is left alone."""
    level = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def producer(connection: KafkaConnection, client_id: str, **options: Any) -> Any:
    quiet_client_debug()
    try:
        return KafkaProducer(**connection.client_options(), client_id=client_id, **options)
    except KafkaError as error:
        raise translate(error, "connect a producer") from error


def consumer(connection: KafkaConnection, client_id: str, **options: Any) -> Any:
    quiet_client_debug()
    try:
        return KafkaConsumer(**connection.client_options(), client_id=client_id, **options)
    except KafkaError as error:
        raise translate(error, "connect a consumer") from error


def admin(connection: KafkaConnection, client_id: str = "portal-sync-admin", **options: Any) -> Any:
    quiet_client_debug()
    try:
        return KafkaAdminClient(**connection.client_options(), client_id=client_id, **options)
    except KafkaError as error:
        raise translate(error, "connect an admin client") from error
