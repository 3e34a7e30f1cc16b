"""The `debezium` adapter on real components: a PostgreSQL with `wal_level=logical`, Kafka
Connect standalone with the Debezium PostgreSQL connector (pgoutput), the province's topics
on the local broker, `portal-sync produce` and the worker into the national store.

One Connect worker serves the module: two connectors on one source database, one with the
JSON converter's inline schemas (Connect's default) for citizens, one with bare payloads
(`isostring` times, string decimals) for dossiers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka.admin import NewTopic

from portal_sync.settings import Settings
from producers.conformance import check_adapter
from producers.deployment import load_deployment
from producers.sdk import Checkpoint, Record
from producers.state import load_json_state
from tests.conftest import _unavailable
from tests.support.adapter_helpers import dead_letters, published_events, write_config
from tests.support.kafka_connect import ConnectWorker, postgres_connector
from tests.support.kafka_helpers import ensure_topics
from tests.support.pipeline_helpers import cli, exported
from transport import admin
from transport.committed_reader import CommittedOffsetReader
from transport.config import KafkaConnection
from transport.connect import ensure_connect_jars
from transport.local import KafkaSetupError, KafkaStartFailed
from transport.publisher import Publisher
from transport.topics import Topics

pytestmark = pytest.mark.postgres

LAN, BINH, CUONG, DUNG, EM = (f"07919000000{n}" for n in range(1, 6))
DOSSIER = "000.00.01.H29-240115-0001"

SCHEMA = """
CREATE TABLE cong_dan (
    id serial PRIMARY KEY,
    so_dinh_danh varchar(12) NOT NULL UNIQUE,
    ho_ten text,
    gioi_tinh text,
    ngay_sinh date,
    cap_nhat timestamp NOT NULL DEFAULT now()
);
-- The natural key is not the primary key: deletes need it in `before`.
ALTER TABLE cong_dan REPLICA IDENTITY FULL;
CREATE TABLE ho_so (
    id bigserial PRIMARY KEY,
    ma_ho_so text NOT NULL UNIQUE,
    trang_thai text,
    ngay_tiep_nhan timestamp,   -- local wall time
    han_tra timestamptz,
    phi numeric(12, 2)
);
ALTER TABLE ho_so REPLICA IDENTITY FULL;
"""

CONFIG = """
[[sources]]
id = "p79-citizens"
source = "province-79"
adapter = "debezium"

[sources.connection]
bootstrap = "{bootstrap}"
group_id = "{group}"

[sources.mapping]
topics = ["{prefix}.public.cong_dan"]
entity = "citizen"
key_column = "so_dinh_danh"
fields = {{ full_name = "ho_ten", sex = "gioi_tinh", date_of_birth = "ngay_sinh" }}
value_maps = {{ sex = {{ "Nam" = "male", "Nữ" = "female" }} }}

[[sources]]
id = "p79-dossiers"
source = "province-79"
adapter = "debezium"

[sources.connection]
bootstrap = "{bootstrap}"
group_id = "{group}"

[sources.mapping]
topics = ["{bare}.public.ho_so"]
entity = "dossier"
key_column = "ma_ho_so"
local_time_columns = ["ngay_tiep_nhan"]
fields = {{ status = "trang_thai", received_at = "ngay_tiep_nhan", due_at = "han_tra" }}

[sources.mapping.value_maps.status]
MOI = 1
DANG_XU_LY = 4
DA_TRA = 10
"""


@dataclass
class Province:
    """The province's database and its Debezium topics on the broker."""

    url: str
    bootstrap: str
    prefix: str
    bare: str
    worker: ConnectWorker

    @property
    def citizen_topic(self) -> str:
        return f"{self.prefix}.public.cong_dan"

    @property
    def dossier_topic(self) -> str:
        return f"{self.bare}.public.ho_so"

    def connect(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=autocommit)

    def execute(self, *statements: str) -> None:
        with self.connect() as conn:
            for statement in statements:
                conn.execute(statement)

    def wait_for(self, topic: str, messages: int, timeout: float = 60.0) -> None:
        """Until the topic holds `messages` messages (tombstones included)."""
        connection = KafkaConnection(bootstrap=self.bootstrap)
        deadline = time.monotonic() + timeout
        found = 0
        while time.monotonic() < deadline:
            with admin.cluster(connection) as cluster:
                if topic in cluster.topic_names():
                    found = sum(cluster.end_offsets(cluster.partitions([topic])).values())
            if found >= messages:
                return
            time.sleep(0.5)
        raise AssertionError(
            f"{topic}: {found} messages, expected {messages}; see {self.worker.log}"
        )


@pytest.fixture(scope="module")
def province(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Province]:
    from tests.support.postgres_server import PostgresUnavailable, start_postgres

    try:
        server = start_postgres(logical_replication=True)
    except (PostgresUnavailable, OSError) as error:
        _unavailable("PostgreSQL", error)
    try:
        with psycopg.connect(server.admin_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("CREATE DATABASE tthc")
        url = server.url("tthc").replace("+psycopg", "")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA)
            # Rows before the connector starts: its snapshot reads them (op r).
            conn.execute(
                "INSERT INTO cong_dan (so_dinh_danh, ho_ten, gioi_tinh, ngay_sinh) VALUES "
                f"('{LAN}', 'Nguyễn Thị Lan', 'Nữ', '1990-03-05'), "
                f"('{BINH}', 'Trần Văn Bình', 'Nam', NULL), "
                f"('{DUNG}', 'Phạm Văn Dũng', 'Nam', '1985-12-31')"
            )
            conn.execute(
                "INSERT INTO ho_so (ma_ho_so, trang_thai, ngay_tiep_nhan, han_tra, phi) VALUES "
                f"('{DOSSIER}', 'MOI', '2024-01-15 08:30:00', '2024-01-20 17:00:00+07', 12.50)"
            )
        run = uuid.uuid4().hex[:6]
        prefix, bare = f"dbz{run}", f"dbzbare{run}"
        connectors = [
            postgres_connector(f"citizens-{run}", server.port, "tthc", prefix, ["public.cong_dan"]),
            postgres_connector(
                f"dossiers-{run}",
                server.port,
                "tthc",
                bare,
                ["public.ho_so"],
                **{
                    "value.converter": "org.apache.kafka.connect.json.JsonConverter",
                    "value.converter.schemas.enable": "false",
                    "time.precision.mode": "isostring",
                    "decimal.handling.mode": "string",
                },
            ),
        ]
        worker = ConnectWorker(tmp_path_factory.mktemp("connect"), kafka_bootstrap, connectors)
        try:
            ensure_connect_jars()
        except (KafkaSetupError, KafkaStartFailed) as error:
            _unavailable("Kafka Connect and Debezium", error)
        with worker:
            found = Province(url, kafka_bootstrap, prefix, bare, worker)
            found.wait_for(found.citizen_topic, 3)
            found.wait_for(found.dossier_topic, 1)
            yield found
    finally:
        server.stop()


def store_records(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["entity"], r["key"]): r["data"] for r in exported(settings)}


def produce_once(settings: Settings, config: Path) -> str:
    done = cli(settings, "produce", "--config", str(config), "--once")
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_inserts_updates_a_hard_delete_and_a_long_transaction_reach_the_store(
    province: Province, tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    group = f"portal-sync-{uuid.uuid4().hex[:6]}"
    config = write_config(
        tmp_path,
        CONFIG.format(
            bootstrap=province.bootstrap, group=group, prefix=province.prefix, bare=province.bare
        ),
    )

    # 1. The snapshot (op r): three citizens, one dossier.
    out = produce_once(settings, config)
    assert "p79-citizens: published 3, dead-lettered 0" in out
    assert "p79-dossiers: published 1, dead-lettered 0" in out

    # 2. A transaction stays open across a produce run and other committed changes.
    long = province.connect(autocommit=False)
    long.execute(f"UPDATE cong_dan SET ho_ten = 'Nguyễn Thị Lan Anh' WHERE so_dinh_danh = '{LAN}'")
    long.execute(f"INSERT INTO cong_dan (so_dinh_danh, ho_ten) VALUES ('{EM}', 'Lê Thị Em')")
    binh = f"WHERE so_dinh_danh = '{BINH}'"
    province.execute(
        f"INSERT INTO cong_dan (so_dinh_danh, ho_ten, gioi_tinh) VALUES ('{CUONG}', 'Võ', 'Nam')",
        f"UPDATE cong_dan SET ho_ten = 'Trần Văn Bình', ngay_sinh = '1970-01-01' {binh}",
        f"UPDATE cong_dan SET ngay_sinh = '1971-02-03' {binh}",
        f"DELETE FROM cong_dan WHERE so_dinh_danh = '{DUNG}'",  # a hard delete
        f"UPDATE ho_so SET trang_thai = 'DANG_XU_LY', phi = NULL WHERE ma_ho_so = '{DOSSIER}'",
    )
    province.wait_for(province.citizen_topic, 3 + 1 + 2 + 2)  # the delete has its tombstone
    province.wait_for(province.dossier_topic, 2)
    out = produce_once(settings, config)
    assert "p79-citizens: published 4, dead-lettered 0" in out
    long.commit()  # committed last, its changes' LSNs are below those already consumed
    long.close()
    province.wait_for(province.citizen_topic, 8 + 2)
    out = produce_once(settings, config)
    assert "p79-citizens: published 2, dead-lettered 0" in out
    assert "p79-dossiers: published 0, dead-lettered 0" in out

    # 3. The worker applies everything; the store holds the source's current rows.
    done = cli(settings, "worker", "--until-caught-up")
    assert done.returncode == 0, done.stdout + done.stderr
    records = store_records(settings)
    assert records[("citizen", LAN)] == {
        "full_name": "Nguyễn Thị Lan Anh",
        "sex": "female",
        "date_of_birth": "1990-03-05",
    }
    assert records[("citizen", BINH)]["date_of_birth"] == "1971-02-03"
    assert records[("citizen", CUONG)]["full_name"] == "Võ"
    assert records[("citizen", EM)] == {
        "full_name": "Lê Thị Em",
        "sex": None,
        "date_of_birth": None,
    }
    assert ("citizen", DUNG) not in records
    dossier = records[("dossier", DOSSIER)]
    assert dossier["status"] == 4
    # A wall time read as UTC+7 and an instant, both held in UTC as the contract holds them
    assert dossier["received_at"] == "2024-01-15T01:30:00Z"
    assert dossier["due_at"] == "2024-01-20T10:00:00Z"

    # 4. Versions: reads below changes; per record rising; deletes from `before`.
    events = published_events(settings, "citizen")
    lan = [e for e in events if e["key"] == LAN]
    assert [e["version"] < 2**52 for e in lan] == [True, False]
    assert [e["op"] for e in events if e["key"] == DUNG] == ["upsert", "delete"]
    assert not dead_letters(settings)

    # 5. The checkpoint is the group's offsets on the province's cluster: at the end now.
    ends = {province.citizen_topic: 10, province.dossier_topic: 2}
    for topic, end in ends.items():
        reader = CommittedOffsetReader(
            KafkaConnection(bootstrap=province.bootstrap), group, [topic]
        )
        reader.start({})
        assert reader.committed() == {(topic, 0): end}
        reader.close()
    state = load_json_state(tmp_path / "state" / "p79-citizens.state.json")
    assert state["offsets"] == {f"{province.citizen_topic}:0": 10}
    out = produce_once(settings, config)
    assert "p79-citizens: published 0, dead-lettered 0" in out

    # 6. The conformance checks, on everything the topic holds (from the beginning).
    deploy = load_deployment(config)
    adapter = deploy.adapter(deploy.sources[0].model_copy(update={"connection": {
        "bootstrap": province.bootstrap, "group_id": f"{group}-check"}}))  # fmt: skip
    report = check_adapter(adapter, "p79-citizens", "debezium")
    adapter.close()
    assert report.passed, [(r.name, r.detail, r.examples) for r in report.results]
    assert len(report.first.emitted) == 9  # 10 messages, one tombstone


def _topic_of_its_own(
    province: Province, prefix: str, messages: list[tuple[bytes, bytes | None]]
) -> str:
    """A one-partition province topic holding `messages` (key, value), in that order."""
    topic = f"{prefix}{uuid.uuid4().hex[:6]}"
    connection = KafkaConnection(bootstrap=province.bootstrap)
    with admin.cluster(connection) as cluster:
        cluster.admin.create_topics([NewTopic(topic, 1, 1)])
    publisher = Publisher(connection, Topics("unused"), client_id="test-province")
    for key, value in messages:
        publisher.send(topic, key, value)
    publisher.flush()
    publisher.close()
    return topic


def _citizens_of(province: Province, entry: str, group: str, topic: str) -> str:
    """A deployment file's debezium entry reading citizens' names from `topic`."""
    return f"""
[[sources]]
id = "{entry}"
source = "province-79"
adapter = "debezium"

[sources.connection]
bootstrap = "{province.bootstrap}"
group_id = "{group}"

[sources.mapping]
topics = ["{topic}"]
entity = "citizen"
key_column = "so_dinh_danh"
fields = {{ full_name = "ho_ten" }}
"""


def test_unmappable_messages_are_dead_letters_and_a_check_commits_nothing(
    province: Province, tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """A delete whose key column is not in `before`, a message that is not a change event,
    and a tombstone, on a topic of their own; `adapters check` reads without committing."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    source = {"lsn": 26376776, "ts_ms": int(time.time() * 1000), "connector": "postgresql"}
    no_key = {"op": "d", "before": {"id": 2, "so_dinh_danh": ""}, "after": None, "source": source}
    row = {"so_dinh_danh": LAN, "ho_ten": "Lan"}
    insert = {"op": "c", "before": None, "after": row, "source": source}
    values = (json.dumps(no_key).encode(), b"[1, 2", None, json.dumps(insert).encode())
    topic = _topic_of_its_own(province, "dbzbad", [(b'{"id":2}', value) for value in values])
    connection = KafkaConnection(bootstrap=province.bootstrap)
    config = write_config(tmp_path, _citizens_of(province, "p79-bad", f"bad-{topic}", topic))
    checked = cli(settings, "adapters", "check", "--config", str(config))
    assert "p79-bad" in checked.stdout
    reader = CommittedOffsetReader(connection, f"bad-{topic}", [topic])
    reader.start({})
    assert reader.committed() == {}

    out = produce_once(settings, config)
    assert "p79-bad: published 1, dead-lettered 2" in out
    letters = dead_letters(settings)
    assert sorted(letter["ps.reason.code"] for letter in letters) == [
        "invalid_json",
        "missing_field",
    ]
    assert {letter["ps.origin.offset"] for letter in letters} == {f"{topic}:0:0", f"{topic}:0:1"}
    missing = next(x for x in letters if x["ps.reason.code"] == "missing_field")
    assert "REPLICA IDENTITY FULL" in missing["ps.reason.message"]
    assert reader.committed() == {(topic, 0): 4}
    reader.close()


def _one_topic_adapter(tmp_path: Path, bootstrap: str, group: str, topic: str) -> Any:
    """The citizens' adapter of CONFIG reading `topic` alone, its name field only."""
    body = CONFIG.split("[[sources]]")[1].format(
        bootstrap=bootstrap, group=group, prefix="unused", bare="unused"
    )
    deploy = load_deployment(write_config(tmp_path, "[[sources]]" + body))
    entry = deploy.sources[0]
    entry.mapping["topics"] = [topic]
    entry.mapping["fields"] = {"full_name": "ho_ten"}
    entry.mapping.pop("value_maps")
    return deploy.adapter(entry)


def test_a_transactional_writer_aborted_changes_are_never_read(
    province: Province, tmp_path: Path
) -> None:
    """Connect with exactly-once source support writes in transactions: what it aborted is
    not read, and a run ends at the end offset although the last one is a commit marker."""
    from kafka import KafkaProducer

    topic = f"dbztx{uuid.uuid4().hex[:6]}"
    connection = KafkaConnection(bootstrap=province.bootstrap)
    with admin.cluster(connection) as cluster:
        cluster.admin.create_topics([NewTopic(topic, 1, 1)])
    source = {"lsn": 26376776, "ts_ms": int(time.time() * 1000), "connector": "postgresql"}

    def event(name: str, lsn: int) -> bytes:
        row = {"so_dinh_danh": LAN, "ho_ten": name}
        payload = {"op": "u", "before": None, "after": row, "source": source | {"lsn": lsn}}
        return json.dumps(payload).encode()

    producer = KafkaProducer(bootstrap_servers=province.bootstrap, transactional_id=topic)
    producer.init_transactions()
    for name, lsn, commit in (("Lan", 100, True), ("Aborted", 200, False), ("Lan Anh", 300, True)):
        producer.begin_transaction()
        producer.send(topic, key=b'{"id":1}', value=event(name, lsn))
        producer.flush()  # on the log, the aborted one too
        if commit:
            producer.commit_transaction()
        else:
            producer.abort_transaction()
    producer.close()
    adapter = _one_topic_adapter(tmp_path, province.bootstrap, f"tx-{topic}", topic)
    started = time.monotonic()
    items = list(adapter.read({}))
    adapter.close()
    records = [i for i in items if isinstance(i, Record)]
    assert [(r.data or {}).get("full_name") for r in records] == ["Lan", "Lan Anh"]
    (checkpoint,) = [i for i in items if isinstance(i, Checkpoint)]
    assert checkpoint.state["offsets"] == {f"{topic}:0": 6}  # 3 messages, 3 markers
    assert [r.origin for r in records] == [f"{topic}:0:0", f"{topic}:0:4"]
    assert time.monotonic() - started < 3  # not waiting out idle_seconds


def test_a_topic_created_again_and_refilled_past_the_saved_position_stops_the_source(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The province deletes its topic and creates it again (a connector reset), and its new
    log already reaches past the adapter's saved position before the next run: the offsets
    alone look right, the topic's id does not. The source stops instead of skipping the new
    log's first messages."""
    from producers.sdk import FatalError

    topic = f"dbzre{uuid.uuid4().hex[:6]}"
    connection = KafkaConnection(bootstrap=kafka_bootstrap)
    source = {"lsn": 26376776, "ts_ms": int(time.time() * 1000), "connector": "postgresql"}

    def fill(names: list[str]) -> None:
        publisher = Publisher(connection, Topics("unused"), client_id="test-province")
        for lsn, name in enumerate(names, 100):
            row = {"so_dinh_danh": LAN, "ho_ten": name}
            payload = {"op": "u", "before": None, "after": row, "source": source | {"lsn": lsn}}
            publisher.send(topic, b'{"id":1}', json.dumps(payload).encode())
        publisher.flush()
        publisher.close()

    with admin.cluster(connection) as cluster:
        cluster.admin.create_topics([NewTopic(topic, 1, 1)])
    fill(["Lan", "Lan Anh"])
    adapter = _one_topic_adapter(tmp_path, kafka_bootstrap, f"re-{topic}", topic)
    try:
        (checkpoint,) = [i for i in adapter.read({}) if isinstance(i, Checkpoint)]
        assert checkpoint.commit is not None
        checkpoint.commit()
        state = checkpoint.state
        assert state["offsets"] == {f"{topic}:0": 2} and set(state["topic_ids"]) == {topic}

        with admin.cluster(connection) as cluster:
            cluster.delete_topics([topic])
            deadline = time.monotonic() + 30
            while True:  # the deletion may still be under way
                try:
                    cluster.admin.create_topics([NewTopic(topic, 1, 1)])
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        fill(["Cường", "Dũng", "Em", "Lan", "Lan Anh"])  # past the saved position 2
        with pytest.raises(FatalError, match=f"created again since the saved position: {topic}"):
            list(adapter.read(state))
        # Started from its beginning (its state removed), it reads the new log whole.
        records = [i for i in adapter.read({}) if isinstance(i, Record)]
        assert [(r.data or {}).get("full_name") for r in records][:2] == ["Cường", "Dũng"]
    finally:
        adapter.close()


def test_messages_that_expired_unread_are_warned_of_and_counted(
    province: Province, tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """The province topic's retention removed messages this source had not read (its
    producer down longer than the retention): reading went on from the oldest message
    kept, without a word. It still goes on (nothing else can be read), but says how many
    messages of which partition were lost, and counts it (`expired_unread`)."""
    from kafka import KafkaAdminClient
    from kafka.structs import TopicPartition

    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    source = {"lsn": 26376776, "ts_ms": int(time.time() * 1000), "connector": "postgresql"}
    messages: list[tuple[bytes, bytes | None]] = []
    for n in range(5):
        row = {"so_dinh_danh": f"0791900000{n:02d}", "ho_ten": f"Người {n}"}
        insert = {"op": "c", "before": None, "after": row, "source": source | {"lsn": 100 + n}}
        messages.append((json.dumps({"id": n}).encode(), json.dumps(insert).encode()))
    topic = _topic_of_its_own(province, "dbzgone", messages)
    config = write_config(tmp_path, _citizens_of(province, "p79-gone", f"gone-{topic}", topic))
    state = tmp_path / "state" / "p79-gone.state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"group_id": f"gone-{topic}", "offsets": {f"{topic}:0": 1}}))
    client = KafkaAdminClient(bootstrap_servers=province.bootstrap)
    try:
        client.delete_records({TopicPartition(topic, 0): 3})  # two unread messages gone
    finally:
        client.close()

    out = " ".join(produce_once(settings, config).split())
    assert f"{topic}[0]: 2 messages expired unread" in out, out
    assert "p79-gone: published 2, dead-lettered 0" in out, out


@pytest.mark.parametrize(
    ("configs", "refused"),
    [
        ({"cleanup.policy": "compact"}, True),
        ({"cleanup.policy": "compact,delete", "min.compaction.lag.ms": "3600000"}, True),
        ({"cleanup.policy": "compact", "min.compaction.lag.ms": str(7 * 86_400_000)}, False),
        ({"cleanup.policy": "delete"}, False),
    ],
)
def test_a_topic_compacted_sooner_than_a_week_stops_the_source(
    kafka_bootstrap: str, tmp_path: Path, configs: dict[str, str], refused: bool
) -> None:
    """The log cleaner drops a delete's event once its tombstone supersedes it: a source
    paused past the cleaner read the tombstone only (nothing to send), the record stayed
    live nationally, and nothing counted it. Such a topic now stops the source."""
    from producers.sdk import FatalError

    topic = f"dbzcmp{uuid.uuid4().hex[:6]}"
    connection = KafkaConnection(bootstrap=kafka_bootstrap)
    with admin.cluster(connection) as cluster:
        cluster.admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    adapter = _one_topic_adapter(tmp_path, kafka_bootstrap, f"cmp-{topic}", topic)
    try:
        if refused:
            with pytest.raises(FatalError, match=f"compacted sooner than 7 days: {topic}"):
                list(adapter.read({}))
        else:
            assert not [i for i in adapter.read({}) if isinstance(i, Record)]
    finally:
        adapter.close()
