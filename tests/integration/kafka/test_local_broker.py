"""The local development broker's start-up steps, on the real Kafka jars."""

from __future__ import annotations

import subprocess
import uuid
from base64 import urlsafe_b64encode
from pathlib import Path

from transport.local import LocalKafka, ensure_jars, ensure_java, format_command, free_port


def test_a_cluster_id_starting_with_a_dash_formats_the_storage(tmp_path: Path) -> None:
    """KRaft cluster ids are base64url: one in 64 starts with '-', which a separate
    argument would turn into an option ("expected one argument")."""
    raw = bytearray(uuid.uuid4().bytes)
    raw[0] = 0xFB  # the first base64url character becomes '-'
    cluster_id = urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    assert cluster_id.startswith("-")
    broker = LocalKafka(tmp_path)
    broker._save_state(port=free_port(), controller_port=free_port())
    properties = broker._write_config()
    command = format_command(ensure_java(), ensure_jars(), properties, cluster_id)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = (tmp_path / "data" / "meta.properties").read_text()
    assert f"cluster.id={cluster_id}" in meta
