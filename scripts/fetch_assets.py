#!/usr/bin/env python3
"""Fetch the web application's third-party assets, pinned in web-assets.lock.json.

Standard library only, so that a machine with nothing but Python can run the demo: each npm
tarball is downloaded from the registry, checked against the ``sha512`` integrity in the lock
(the same value ``npm`` records in ``package-lock.json``), and only the files the lock names are
written into ``src/iotvault/web/static/vendor/`` (gitignored; the wheel ships them). A stamp
file holds the lock's digest: when it matches, nothing is fetched again.

    python3 scripts/fetch_assets.py            # fetch what is missing
    python3 scripts/fetch_assets.py --check    # exit 1 unless the assets match the lock

Exit status: 0 done, 1 a download or a check failed (the message says which package).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "web-assets.lock.json"
VENDOR = ROOT / "src" / "iotvault" / "web" / "static" / "vendor"
STAMP = VENDOR / ".lock-sha256"
REGISTRY = "https://registry.npmjs.org/"
TIMEOUT_S = 60


class AssetError(Exception):
    pass


def _lock_digest() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def _download(url: str) -> bytes:
    if not url.startswith(REGISTRY):
        raise AssetError(f"{url}: only {REGISTRY} is trusted")
    request = urllib.request.Request(url, headers={"User-Agent": "iotvault-fetch-assets"})  # noqa: S310 - https only, checked above
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310 - https only, checked above
        data: bytes = answer.read()
    return data


def verify(data: bytes, integrity: str, name: str) -> None:
    """Subresource-integrity check of a tarball: ``sha512-<base64>`` as npm writes it."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise AssetError(f"{name}: the lock's integrity must be sha512-<base64>")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise AssetError(f"{name}: integrity mismatch (lock {integrity}, got sha512-{actual})")


def extract(data: bytes, files: dict[str, str], name: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member_name, target in files.items():
            member = tar.getmember(member_name) if member_name in tar.getnames() else None
            if member is None or not member.isfile():
                raise AssetError(f"{name}: {member_name} is not in the tarball")
            dest = (VENDOR / target).resolve()
            if VENDOR.resolve() not in dest.parents:
                raise AssetError(f"{name}: {target} points outside the vendor folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise AssetError(f"{name}: cannot read {member_name}")
            dest.write_bytes(source.read())


def fetch(force: bool = False) -> int:
    lock = json.loads(LOCK.read_text(encoding="utf-8"))
    digest = _lock_digest()
    if not force and STAMP.is_file() and STAMP.read_text().strip() == digest:
        STAMP.touch()  # up to date: make need not run this again
        return 0
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    VENDOR.mkdir(parents=True)
    for package in lock["packages"]:
        label = f"{package['name']}@{package['version']}"
        data = _download(package["tarball"])
        verify(data, package["integrity"], label)
        extract(data, package["files"], label)
    STAMP.write_text(digest + "\n")
    return 0


def check() -> int:
    if not STAMP.is_file() or STAMP.read_text().strip() != _lock_digest():
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only check that the assets match the lock")
    parser.add_argument("--force", action="store_true", help="fetch again even if the stamp matches")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    try:
        return fetch(force=args.force)
    except (AssetError, OSError, tarfile.TarError, KeyError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
