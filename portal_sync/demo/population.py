"""The demo's sample population: Vietnamese names (NFC; some sources store them NFD),
addresses in the 34 provinces, people and organisations."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from zoneinfo import ZoneInfo

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
