"""Sample source systems for the demo: SQLite databases of provinces and a ministry.

Each source is an administrative-procedure system with its own table layout (Vietnamese
column names), its own soft-delete flag and either a row-version column or only an update
timestamp. Some citizens and organisations are held by several sources that disagree; some
names are stored decomposed (NFD) to exercise NFC normalisation; a few rows break the
contract and must reach the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    update,
)
from vietnam_provinces import Province, ProvinceCode, Ward

from portal_sync.demo.population import (
    BUSINESS,
    DOC_TYPES,
    FORMS,
    LINES,
    PROCEDURES,
    STREETS,
    ZONE,
    Person,
    World,
)
from producers.sql_config import SqlSourceConfig


@dataclass(frozen=True)
class SourceSpec:
    source: str
    name: str
    province: str  # 2-digit code in force since 2025-07-01
    unit_code: str  # receiving unit code used in dossier codes
    row_version: bool  # has a row-version column, else versions come from timestamps


SOURCES = [
    SourceSpec("province-01", "Hệ thống TTHC Thành phố Hà Nội", "01", "000.00.01.H26", True),
    SourceSpec("province-79", "Hệ thống TTHC Thành phố Hồ Chí Minh", "79", "000.00.01.H29", False),
    SourceSpec("province-48", "Hệ thống TTHC Thành phố Đà Nẵng", "48", "000.00.01.H17", False),
    SourceSpec("ministry-btp", "Hệ thống TTHC Bộ Tư pháp", "01", "000.00.00.G12", True),
]


def _tables(metadata: MetaData, row_version: bool) -> dict[str, Table]:
    def common() -> list[Column[Any]]:
        cols: list[Column[Any]] = [
            Column("da_xoa", Boolean, nullable=False, default=False),
            Column("cap_nhat_luc", DateTime, nullable=False, index=True),
        ]
        if row_version:
            cols.append(Column("phien_ban", Integer, nullable=False))
        return cols

    return {
        "citizen": Table(
            "cong_dan",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("so_dinh_danh", String(20), nullable=False, unique=True),
            Column("ho_ten", String(200)),
            Column("ngay_sinh", Date),
            Column("nam_sinh", Integer),  # the year alone, where the book gives no day
            Column("gioi_tinh", String(10)),
            Column("ma_tinh", String(2)),
            Column("ma_xa", String(5)),
            Column("dia_chi", String(300)),
            Column("dien_thoai", String(20)),
            Column("email", String(200)),
            *common(),
        ),
        "organization": Table(
            "doanh_nghiep",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("ma_so_thue", String(14), nullable=False, unique=True),
            Column("ten", String(300)),
            Column("ten_tieng_anh", String(300)),
            Column("loai_hinh", String(100)),
            Column("tinh_trang", String(20)),
            Column("ma_tinh", String(2)),
            Column("ma_xa", String(5)),
            Column("dia_chi", String(300)),
            Column("nguoi_dai_dien", String(12)),
            Column("ngay_thanh_lap", Date),
            *common(),
        ),
        "document": Table(
            "giay_to",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("ma_giay_to", String(64), nullable=False, unique=True),
            Column("loai_chu_the", String(20)),
            Column("ma_chu_the", String(14)),
            Column("loai_giay_to", String(64)),
            Column("tieu_de", String(300)),
            Column("co_quan_cap", String(64)),
            Column("ngay_cap", Date),
            Column("hieu_luc_den", Date),
            Column("trang_thai", String(20)),
            Column("sha256", String(64)),
            *common(),
        ),
        "dossier": Table(
            "ho_so",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("ma_ho_so", String(40), nullable=False, unique=True),
            Column("ma_tthc", String(20)),
            Column("ma_don_vi", String(20)),
            Column("loai_doi_tuong", String(20)),
            Column("ma_doi_tuong", String(14)),
            Column("trang_thai", Integer),
            Column("ngay_tiep_nhan", DateTime),
            Column("ngay_hen_tra", DateTime),
            Column("ngay_tra", DateTime),
            Column("ma_ho_so_goc", String(40)),
            *common(),
        ),
    }


FIELD_MAPS: dict[str, tuple[str, dict[str, str]]] = {
    "citizen": (
        "so_dinh_danh",
        {
            "full_name": "ho_ten",
            "date_of_birth": "ngay_sinh",
            "year_of_birth": "nam_sinh",
            "sex": "gioi_tinh",
            "permanent_address.province_code": "ma_tinh",
            "permanent_address.ward_code": "ma_xa",
            "permanent_address.line": "dia_chi",
            "phone": "dien_thoai",
            "email": "email",
        },
    ),
    "organization": (
        "ma_so_thue",
        {
            "name": "ten",
            "english_name": "ten_tieng_anh",
            "legal_form": "loai_hinh",
            "status": "tinh_trang",
            "address.province_code": "ma_tinh",
            "address.ward_code": "ma_xa",
            "address.line": "dia_chi",
            "legal_representative_id": "nguoi_dai_dien",
            "established_on": "ngay_thanh_lap",
        },
    ),
    "document": (
        "ma_giay_to",
        {
            "owner_kind": "loai_chu_the",
            "owner_id": "ma_chu_the",
            "doc_type": "loai_giay_to",
            "title": "tieu_de",
            "issuer_code": "co_quan_cap",
            "issued_on": "ngay_cap",
            "valid_until": "hieu_luc_den",
            "status": "trang_thai",
            "file_sha256": "sha256",
        },
    ),
    "dossier": (
        "ma_ho_so",
        {
            "procedure_code": "ma_tthc",
            "agency_code": "ma_don_vi",
            "applicant_kind": "loai_doi_tuong",
            "applicant_id": "ma_doi_tuong",
            "status": "trang_thai",
            "received_at": "ngay_tiep_nhan",
            "due_at": "ngay_hen_tra",
            "finished_at": "ngay_tra",
            "original_code": "ma_ho_so_goc",
        },
    ),
}


# Hồ Chí Minh City's system stores sex as 'Nam' / 'Nữ': a value map makes it the contract's.
LOCAL_SEX = {"province-79": {"male": "Nam", "female": "Nữ"}}


def adapter_configs(spec: SourceSpec, url: str) -> list[SqlSourceConfig]:
    """The SQL polling configuration of every table of one sample source."""
    configs = []
    local_sex = LOCAL_SEX.get(spec.source)
    for entity, table in _tables(MetaData(), spec.row_version).items():
        key_column, fields = FIELD_MAPS[entity]
        configs.append(
            SqlSourceConfig(
                source=spec.source,
                url=url,
                entity=entity,
                table=table.name,
                key_column=key_column,
                pk_column="id",
                updated_at_column="cap_nhat_luc",
                version_column="phien_ban" if spec.row_version else None,
                deleted_column="da_xoa",
                fields=fields,
                value_maps=(
                    {"sex": {v: k for k, v in local_sex.items()}}
                    if local_sex and entity == "citizen"
                    else {}
                ),
                lookback_seconds=60,
            )
        )
    return configs


def deployment_toml(
    sources: list[SampleSource],
    state_dir: Path,
    interval: float,
    signing_keys: dict[str, Path] | None = None,
) -> str:
    """The demo's deployment file: one `sql` source per table of every sample source,
    each signing with its source's key (`signing_keys`: source -> key file)."""
    signing_keys = signing_keys or {}
    lines = [
        "# Generated by `portal-sync demo`.",
        "[producer]",
        f"state_dir = {toml_value(state_dir)}",
    ]
    for source in sources:
        for config in adapter_configs(source.spec, source.url):
            mapping = config.model_dump(exclude={"source", "url"}, exclude_defaults=True)
            lines += [
                "",
                "[[sources]]",
                f"id = {toml_value(config.name)}",
                f"source = {toml_value(config.source)}",
                'adapter = "sql"',
                f"interval_seconds = {interval}",
                f"connection = {{ url = {toml_value(config.url)} }}",
                *(
                    [f"signing_key_file = {toml_value(signing_keys[config.source])}"]
                    if config.source in signing_keys
                    else []
                ),
                "[sources.mapping]",
                *(f"{name} = {toml_value(value)}" for name, value in mapping.items()),
            ]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A TOML value (JSON strings are valid TOML basic strings)."""

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, datetime):
        return value.isoformat()
    return json.dumps(str(value), ensure_ascii=False)


class SampleSource:
    """One sample source database and the changes the demo makes to it."""

    def __init__(self, spec: SourceSpec, path: Path, world: World) -> None:
        self.spec = spec
        self.url = f"sqlite:///{path}"
        self.engine: Engine = create_engine(self.url, hide_parameters=True)
        self.tables = _tables(MetaData(), spec.row_version)
        next(iter(self.tables.values())).metadata.create_all(self.engine)
        self.world = world
        self.rng = random.Random(f"{world.rng.random()}-{spec.source}")
        province = Province.from_code(ProvinceCode(int(spec.province)))
        self.wards = [f"{int(w.code):05d}" for w in Ward.iter_by_province(province.code)]
        # A dossier's number counts within its day at its agency, as the codes do: one count
        # for every day ran past 9999 at 60,000 people, and the codes were no longer valid.
        self.day_seqs: Counter[date] = Counter()

    def now(self, behind_seconds: float = 0.0) -> datetime:
        """Local wall time as the source stores it (naive, Asia/Ho_Chi_Minh)."""
        return (datetime.now(ZONE) - timedelta(seconds=behind_seconds)).replace(tzinfo=None)

    def _stamp(self, row: dict[str, Any], behind: float = 0.0) -> dict[str, Any]:
        row["cap_nhat_luc"] = self.now(behind)
        row.setdefault("da_xoa", False)
        if self.spec.row_version:
            row["phien_ban"] = row.get("phien_ban", 0) + 1
        return row

    # -- rows ---------------------------------------------------------------------------
    def citizen_row(self, person: Person, disagree: bool = False) -> dict[str, Any]:
        rng = self.rng
        name = person.name
        if disagree and rng.random() < 0.5:
            name = unicodedata.normalize("NFD", name)  # same name, decomposed diacritics
        # some sources' books give an older person's year of birth alone
        year_only = person.dob.year < 1960 and rng.random() < 0.4
        return {
            "so_dinh_danh": person.pid,
            "ho_ten": name,
            "ngay_sinh": None if year_only else person.dob,
            "nam_sinh": person.dob.year if year_only else None,
            "gioi_tinh": LOCAL_SEX.get(self.spec.source, {}).get(person.sex, person.sex),
            "ma_tinh": self.spec.province,
            "ma_xa": rng.choice(self.wards),
            "dia_chi": f"Số {rng.randint(1, 300)} {rng.choice(STREETS)}",
            "dien_thoai": f"09{rng.randrange(10**8):08d}" if rng.random() < 0.8 else None,
            "email": f"cd{person.pid[-6:]}@example.vn" if rng.random() < 0.3 else None,
        }

    def organization_row(self, code: str) -> dict[str, Any]:
        rng = self.rng
        form, suffix = rng.choice(FORMS)
        brand, line = rng.choice(BUSINESS), rng.choice(LINES)
        return {
            "ma_so_thue": code,
            "ten": f"{form} {line} {brand}",
            "ten_tieng_anh": f"{_ascii(brand)} {suffix}",
            "loai_hinh": form,
            "tinh_trang": "active",
            "ma_tinh": self.spec.province,
            "ma_xa": rng.choice(self.wards),
            "dia_chi": f"Số {rng.randint(1, 500)} {rng.choice(STREETS)}",
            "nguoi_dai_dien": rng.choice(self.world.people).pid,
            "ngay_thanh_lap": date(2000, 1, 1) + timedelta(days=rng.randrange(9000)),
        }

    def document_row(self, seq: int) -> dict[str, Any]:
        rng = self.rng
        person = rng.choice(self.world.people)
        doc_type = rng.choice(DOC_TYPES)
        issued = date(2023, 1, 1) + timedelta(days=rng.randrange(900))
        return {
            "ma_giay_to": f"{self.spec.unit_code}:{doc_type}-{seq:06d}",
            "loai_chu_the": "citizen",
            "ma_chu_the": person.pid,
            "loai_giay_to": doc_type,
            "tieu_de": f"Kết quả giải quyết TTHC của {person.name}",
            "co_quan_cap": self.spec.unit_code,
            "ngay_cap": issued,
            "hieu_luc_den": issued + timedelta(days=365 * 5),
            "trang_thai": "valid",
            "sha256": hashlib.sha256(f"{self.spec.source}-{seq}".encode()).hexdigest(),
        }

    def dossier_row(self) -> dict[str, Any]:
        rng = self.rng
        received = datetime(2025, 7, 1, 8) + timedelta(minutes=rng.randrange(500_000))
        self.day_seqs[received.date()] += 1
        number = self.day_seqs[received.date()]
        person = rng.choice(self.world.people)
        return {
            "ma_ho_so": f"{self.spec.unit_code}-{received:%y%m%d}-{number:04d}",
            "ma_tthc": rng.choice(PROCEDURES),
            "ma_don_vi": self.spec.unit_code,
            "loai_doi_tuong": "citizen",
            "ma_doi_tuong": person.pid,
            "trang_thai": 1,
            "ngay_tiep_nhan": received,
            "ngay_hen_tra": received + timedelta(days=rng.choice([3, 5, 7, 15])),
            "ngay_tra": None,
            "ma_ho_so_goc": None,
        }

    def transferred_row(self, original_key: str) -> dict[str, Any]:
        """An inter-agency (liên thông) dossier received from another agency: its own code,
        referencing the original so that it is never counted twice."""
        row = self.dossier_row()
        row["ma_ho_so_goc"] = original_key
        return row

    # -- writes -------------------------------------------------------------------------
    def insert(self, entity: str, rows: list[dict[str, Any]], behind: float = 0.0) -> None:
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert(self.tables[entity]), [self._stamp(r, behind) for r in rows])

    def change(self, entity: str, key: str, values: dict[str, Any]) -> None:
        """Update one row by natural key, stamping it as the source system would."""
        table = self.tables[entity]
        key_column = table.c[FIELD_MAPS[entity][0]]
        with self.engine.begin() as conn:
            row = conn.execute(select(table).where(key_column == key)).one()._asdict()
            row.update(values)
            self._stamp(row)
            conn.execute(update(table).where(key_column == key).values(row))

    def keys(self, entity: str) -> list[str]:
        table = self.tables[entity]
        key_column = table.c[FIELD_MAPS[entity][0]]
        with self.engine.connect() as conn:
            rows = conn.execute(select(key_column).where(table.c.da_xoa.is_(False)))
            return [row[0] for row in rows]


def _ascii(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text.replace("Đ", "D").replace("đ", "d"))
    return "".join(c for c in decomposed if not unicodedata.combining(c))
