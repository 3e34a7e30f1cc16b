"""Sample source systems for `portal-sync demo`: SQLite databases of provinces and a ministry.

Each source is an administrative-procedure system with its own table layout (Vietnamese
column names), its own soft-delete flag and either a row-version column or only an update
timestamp. Some citizens and organisations are held by several sources that disagree; some
names are stored decomposed (NFD) to exercise NFC normalisation; a few rows break the
contract and must reach the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

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

from producers.sql_polling import SqlSourceConfig
from schemas.identifiers import tax_code_check_digit

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
FAMILY = [
    "Nguyễn",
    "Trần",
    "Lê",
    "Phạm",
    "Hoàng",
    "Huỳnh",
    "Phan",
    "Vũ",
    "Võ",
    "Đặng",
    "Bùi",
    "Đỗ",
    "Hồ",
    "Ngô",
    "Dương",
    "Lý",
]
MIDDLE_M = ["Văn", "Hữu", "Đức", "Minh", "Quang", "Gia", "Thành", "Công"]
MIDDLE_F = ["Thị", "Ngọc", "Thu", "Thanh", "Hoài", "Bảo", "Kim", "Mỹ"]
GIVEN_M = [
    "An",
    "Bình",
    "Dũng",
    "Hải",
    "Hiếu",
    "Hùng",
    "Khánh",
    "Long",
    "Minh",
    "Nam",
    "Phong",
    "Phúc",
    "Quân",
    "Sơn",
    "Thắng",
    "Trung",
    "Tuấn",
    "Việt",
]
GIVEN_F = [
    "Châu",
    "Giang",
    "Hà",
    "Hạnh",
    "Hoa",
    "Hương",
    "Lan",
    "Linh",
    "Mai",
    "Ngân",
    "Nhung",
    "Quỳnh",
    "Tâm",
    "Thảo",
    "Trang",
    "Uyên",
    "Vy",
    "Yến",
]
STREETS = [
    "Lê Lợi",
    "Trần Hưng Đạo",
    "Nguyễn Huệ",
    "Hai Bà Trưng",
    "Lý Thường Kiệt",
    "Điện Biên Phủ",
    "Phan Chu Trinh",
    "Nguyễn Trãi",
    "Hùng Vương",
    "Bạch Đằng",
]
BUSINESS = [
    "Minh Phát",
    "Sao Việt",
    "Hòa Bình",
    "Phú Thịnh",
    "Đại Dương",
    "Trường Sơn",
    "An Khang",
    "Việt Thắng",
    "Hưng Thịnh",
    "Ánh Dương",
    "Đông Á",
    "Tân Tiến",
]
LINES = [
    "Thương mại Dịch vụ",
    "Xây dựng",
    "Công nghệ Thông tin",
    "Vận tải",
    "Nông sản",
    "Du lịch",
    "Dược phẩm",
    "Cơ khí",
]
FORMS = [
    ("Công ty TNHH một thành viên", "Co., Ltd"),
    ("Công ty cổ phần", "JSC"),
    ("Doanh nghiệp tư nhân", "Private Enterprise"),
]
PROCEDURES = ["1.005129", "2.001178", "1.001612", "2.000748", "1.004227", "1.010803"]
DOC_TYPES = ["KQ_TTHC", "GIAY_KHAI_SINH", "GIAY_CN_DKKD", "BAN_SAO_CCCD"]
# Province-of-birth codes (old 63-province scheme) used inside personal ids.
BIRTH_CODE = {"01": "001", "79": "079", "48": "048"}


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


def deployment_toml(sources: list[SampleSource], state_dir: Path, interval: float) -> str:
    """The demo's deployment file: one `sql` source per table of every sample source."""
    lines = ["# Generated by `portal-sync demo`.", "[producer]", f"state_dir = {_toml(state_dir)}"]
    for source in sources:
        for config in adapter_configs(source.spec, source.url):
            mapping = config.model_dump(exclude={"source", "url"}, exclude_defaults=True)
            lines += [
                "",
                "[[sources]]",
                f"id = {_toml(config.name)}",
                f"source = {_toml(config.source)}",
                'adapter = "sql"',
                f"interval_seconds = {interval}",
                f"connection = {{ url = {_toml(config.url)} }}",
                "[sources.mapping]",
                *(f"{name} = {_toml(value)}" for name, value in mapping.items()),
            ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A TOML value (JSON strings are valid TOML basic strings)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value), ensure_ascii=False)


@dataclass
class Person:
    pid: str
    name: str
    dob: date
    sex: str


@dataclass
class World:
    """The shared population the sample sources draw from."""

    rng: random.Random
    people: list[Person] = field(default_factory=list)
    companies: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, seed: int, people: int, companies: int) -> World:
        world = cls(random.Random(seed))
        pids: set[str] = set()
        while len(world.people) < people:
            person = world._person()
            if person.pid not in pids:
                pids.add(person.pid)
                world.people.append(person)
        codes: set[str] = set()
        while len(codes) < companies:
            head = f"{world.rng.randint(1, 9)}{world.rng.randrange(10**8):08d}"
            check = tax_code_check_digit(head + "0")
            if check is not None:
                codes.add(head + str(check))
        world.companies = sorted(codes)
        return world

    def _person(self) -> Person:
        rng = self.rng
        sex = rng.choice(["male", "female"])
        dob = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 55))
        century = 0 if dob.year < 2000 else 2
        digit = century + (0 if sex == "male" else 1)
        birth = rng.choice(list(BIRTH_CODE.values()))
        pid = f"{birth}{digit}{dob.year % 100:02d}{rng.randrange(10**6):06d}"
        middle, given = (MIDDLE_M, GIVEN_M) if sex == "male" else (MIDDLE_F, GIVEN_F)
        name = f"{rng.choice(FAMILY)} {rng.choice(middle)} {rng.choice(given)}"
        return Person(pid, name, dob, sex)


class SampleSource:
    """One sample source database and the changes the demo makes to it."""

    def __init__(self, spec: SourceSpec, path: Path, world: World) -> None:
        self.spec = spec
        self.url = f"sqlite:///{path}"
        self.engine: Engine = create_engine(self.url)
        self.tables = _tables(MetaData(), spec.row_version)
        next(iter(self.tables.values())).metadata.create_all(self.engine)
        self.world = world
        self.rng = random.Random(f"{world.rng.random()}-{spec.source}")
        province = Province.from_code(ProvinceCode(int(spec.province)))
        self.wards = [f"{int(w.code):05d}" for w in Ward.iter_by_province(province.code)]
        self.day_seq = 0

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
        return {
            "so_dinh_danh": person.pid,
            "ho_ten": name,
            "ngay_sinh": person.dob,
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
        self.day_seq += 1
        received = datetime(2025, 7, 1, 8) + timedelta(minutes=rng.randrange(500_000))
        person = rng.choice(self.world.people)
        return {
            "ma_ho_so": f"{self.spec.unit_code}-{received:%y%m%d}-{self.day_seq:04d}",
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


PORTAL_FEED_SOURCE = "province-48-motcua"
PORTAL_UNIT = "000.00.02.H17"
# The feed reports the transitions the portal needs: accepted and processing, finished,
# result returned (with its documents).
NEXT_STATUS = {1: 4, 2: 4, 4: 9, 9: 10}


class PortalFeed:
    """Đà Nẵng's one-stop system: drops the JSON it sends to the national portal into a
    folder (the `portal` adapter's inbox), one file per batch of dossier changes."""

    def __init__(self, directory: Path, world: World) -> None:
        self.directory = directory
        self.world = world
        self.rng = random.Random(f"{world.rng.random()}-portal")
        self.dossiers: dict[str, dict[str, Any]] = {}
        self.files = 0

    def submit(self, count: int) -> None:
        for seq in range(1, count + 1):
            received = datetime(2025, 7, 1, 8) + timedelta(minutes=self.rng.randrange(200_000))
            person = self.rng.choice(self.world.people)
            code = f"{PORTAL_UNIT}-{received:%y%m%d}-{seq:04d}"
            self.dossiers[code] = {
                "MaHoSo": code,
                "MaTTHC": self.rng.choice(PROCEDURES),
                "DonViXuLy": PORTAL_UNIT,
                "ChuHoSo": {"HoTen": person.name, "SoDinhDanh": person.pid},
                "LoaiDoiTuong": "1",
                "NgayTiepNhan": f"{received:%Y%m%d%H%M%S}",
                "NgayHenTra": f"{received + timedelta(days=5):%Y%m%d%H%M%S}",
                "TrangThaiHoSo": "1",
            }
        self._drop(list(self.dossiers))

    def advance(self, count: int) -> None:
        """Move some dossiers one status on; returned results carry their documents."""
        open_codes = [c for c, d in self.dossiers.items() if int(d["TrangThaiHoSo"]) < 10]
        chosen = self.rng.sample(open_codes, min(count, len(open_codes)))
        for code in chosen:
            payload = self.dossiers[code]
            status = NEXT_STATUS[int(payload["TrangThaiHoSo"])]
            payload["TrangThaiHoSo"] = str(status)
            if status == 10:
                payload["NgayTra"] = datetime.now(ZONE).strftime("%Y%m%d%H%M%S")
                payload["DanhSachGiayToKetQua"] = [
                    {
                        "MaGiayTo": f"{code}:KQ",
                        "TenGiayTo": "Kết quả giải quyết thủ tục hành chính",
                        "FileSha256": hashlib.sha256(code.encode()).hexdigest(),
                    }
                ]
        self._drop(chosen)

    def _drop(self, codes: list[str]) -> None:
        """Write the file whole, then rename it in: the adapter never sees half a file."""
        import json

        stamp = datetime.now(ZONE).strftime("%Y%m%d%H%M%S")
        payloads = [self.dossiers[code] | {"NgayCapNhat": stamp} for code in codes]
        self.files += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".batch-{self.files:04d}.part"
        partial.write_text(json.dumps(payloads, ensure_ascii=False), encoding="utf-8")
        partial.rename(self.directory / f"batch-{self.files:04d}.json")


def portal_feed_toml(feed: PortalFeed, interval: float) -> str:
    """The deployment-file entry of the one-stop system's portal feed."""
    return "\n".join(
        [
            "",
            "[[sources]]",
            f'id = "{PORTAL_FEED_SOURCE}.portal"',
            f'source = "{PORTAL_FEED_SOURCE}"',
            'adapter = "portal"',
            f"interval_seconds = {interval}",
            f"connection = {{ directory = {_toml(feed.directory)} }}",
            "",
        ]
    )
