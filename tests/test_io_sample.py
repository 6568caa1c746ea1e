"""Reader metadata as JSON data (:func:`m3bind.io.sample.json_meta`)."""

from __future__ import annotations

import enum
import json
import math

import numpy as np
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import IS, DSfloat, PersonName

from m3bind.io.sample import json_meta


class _Level(enum.IntEnum):
    HIGH = 3


class _Thing:
    def __str__(self) -> str:
        return "a thing"


def _round_trip(obj):
    """The slow obvious version: through JSON text and back."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN and the types compared exactly."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


META = {
    "rows": 512, "spacing": (0.139, 0.139), "window": [DSfloat("40.5"), DSfloat("400")],
    "frames": IS("3"), "level": _Level.HIGH, "uid": UID("1.2.840.10008.1.2"),
    "name": PersonName("Doe^Jane"), "multi": MultiValue(str, ["a", "b"]),
    "array": np.arange(6, dtype=np.int16).reshape(2, 3), "f32": np.float32(0.25),
    "f64": np.float64(1.5), "i64": np.int64(-7), "flag": np.bool_(True), "s": np.str_("x"),
    "nan": float("nan"), "inf": -math.inf, "none": None, "yes": True,
    "nested": {"a": [{"b": (1, 2.5, "c")}], 7: "int key", 2.5: "float key", True: "bool key",
               None: "null key"},
    "thing": _Thing(), "empty": {}, "text": "plain",
}


def test_json_meta_equals_the_json_round_trip():
    got = json_meta(META)
    assert _same(got, _round_trip(META))
    json.dumps(got, allow_nan=True)  # plain data throughout
    assert type(got["uid"]) is str and type(got["frames"]) is int and type(got["window"][0]) is float
    assert got["nested"]["7"] == "int key" and got["nested"]["true"] == "bool key"


def test_json_meta_drops_named_keys_at_any_depth_and_tolerates_odd_keys():
    meta = {"PatientName": "x", "rows": 2, "inner": [{"patient_id": 1, "kept": 2}],
            "deep": {"StudyInstanceUID": "1.2", "ok": {"uid_of_thing": 3, "v": 4}}}
    drop = lambda k: "patient" in k.lower() or "uid" in k.lower()
    assert json_meta(meta, drop) == {"rows": 2, "inner": [{"kept": 2}], "deep": {"ok": {"v": 4}}}
    assert json_meta(meta) == _round_trip(meta)
    # JSON refuses these keys; the metadata keeps them as text instead of failing the item
    assert json_meta({(1, 2): "t", np.int64(3): "n"}) == {"(1, 2)": "t", "3": "n"}
