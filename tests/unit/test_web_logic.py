"""Pure parts of the web application: flattening, the access policy, the asset lock."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from iotvault.auth.policy import Grant, Holder, access_to, reach
from iotvault.web.flatten import MAX_FIELDS, flatten

ROOT = Path(__file__).resolve().parents[2]


def _fetch_assets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_assets", ROOT / "scripts" / "fetch_assets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_assets"] = module
    spec.loader.exec_module(module)
    return module


# ---- flatten ---------------------------------------------------------------------------------
def test_flatten_nested_payloads_into_field_paths() -> None:
    assert flatten({"d": {"temp": 21.5, "tags": ["a", {"x": 1}]}, "ok": True}) == {
        "d.temp": 21.5,
        "d.tags.0": "a",
        "d.tags.1.x": 1,
        "ok": True,
    }
    assert flatten(3) == {"value": 3}


def test_flatten_is_bounded_in_width_and_depth() -> None:
    wide = flatten({str(i): i for i in range(10_000)})
    assert len(wide) == MAX_FIELDS + 1
    assert wide["…"] == "…"
    deep: object = 1
    for _ in range(1000):
        deep = {"a": deep}
    flat = flatten(deep)
    assert len(flat) == 1
    assert next(iter(flat.values())) == "…"


# ---- who can see this device -----------------------------------------------------------------
R = Grant(admin=False, reader=True, writer=False, devices=frozenset({"d1", "d2"}))
W = Grant(admin=False, reader=False, writer=True, devices=frozenset({"d1"}))
A = Grant(admin=True, reader=False, writer=False, devices=frozenset({"d1"}))


def test_access_names_every_holder_and_the_grants_it_comes_through() -> None:
    holders = [
        Holder("user", "alice", (("readers", R),)),
        Holder("user", "bob", (("readers", R), ("writers", W))),
        Holder("user", "root", (("admins", A),)),  # admin grants no device data
        Holder("user", "gone", (("readers", R),), disabled=True),
        Holder("api_key", "k1", (("key", W),)),  # writer without reader: commands, no reads
        Holder("anonymous", "anonymous", (("anonymous", R),)),
    ]
    found = {a.id: a for a in access_to("d1", holders)}
    assert set(found) == {"alice", "bob", "gone", "k1", "anonymous"}
    assert (found["alice"].read, found["alice"].command) == (True, False)
    assert found["bob"].read_via == ("readers",)
    assert found["bob"].command_via == ("writers",)
    assert found["gone"].disabled
    assert (found["k1"].read, found["k1"].command) == (False, True)
    assert {a.id for a in access_to("d2", holders)} == {"alice", "bob", "gone", "anonymous"}
    assert access_to("d3", holders) == []


def test_reach_is_the_union_over_grants() -> None:
    readable, writable, admin = reach(Holder("user", "bob", (("r", R), ("w", W), ("a", A))))
    assert readable == {"d1", "d2"}
    assert writable == {"d1"}
    assert admin


# ---- the asset lock --------------------------------------------------------------------------
def test_asset_integrity_is_checked() -> None:
    fa = _fetch_assets()
    data = b"tarball bytes"
    good = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    fa.verify(data, good, "x@1")
    with pytest.raises(fa.AssetError, match="integrity mismatch"):
        fa.verify(data + b"!", good, "x@1")
    with pytest.raises(fa.AssetError, match="sha512"):
        fa.verify(data, "sha1-abc", "x@1")


def test_assets_are_extracted_only_inside_the_vendor_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fa = _fetch_assets()
    monkeypatch.setattr(fa, "VENDOR", tmp_path / "vendor")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/a.js")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    fa.extract(buf.getvalue(), {"package/a.js": "lib/a.js"}, "x@1")
    assert (tmp_path / "vendor" / "lib" / "a.js").read_bytes() == b"abc"
    with pytest.raises(fa.AssetError, match="outside"):
        fa.extract(buf.getvalue(), {"package/a.js": "../../evil.js"}, "x@1")
    with pytest.raises(fa.AssetError, match="not in the tarball"):
        fa.extract(buf.getvalue(), {"package/b.js": "lib/b.js"}, "x@1")


def test_the_lock_pins_registry_tarballs_with_sha512() -> None:
    lock = json.loads((ROOT / "web-assets.lock.json").read_text())
    for package in lock["packages"]:
        assert package["tarball"].startswith("https://registry.npmjs.org/")
        assert package["integrity"].startswith("sha512-")
        assert f"-{package['version']}.tgz" in package["tarball"]
