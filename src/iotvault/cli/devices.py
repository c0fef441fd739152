"""``iotvault devices …``: the device registry and credentials, and ``iotvault events tail``."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from iotvault.cli.common import DeviceArg, IdArg, JsonOption, YesOption, iso_text, opened, state, where
from iotvault.domain.device_import import spreadsheet_safe

devices_app = typer.Typer(help="Device registry and credentials.", no_args_is_help=True)
events_app = typer.Typer(help="Stored events (decrypted on the way out).", no_args_is_help=True)


@devices_app.command("register")
def devices_register(
    cli: typer.Context,
    type_id: Annotated[str, typer.Argument(metavar="TYPE", help="typeId")],
    device_id: Annotated[str, typer.Argument(metavar="ID", help="deviceId")],
    json_out: JsonOption = False,
) -> None:
    """Register a device; prints its credential once (only a hash is kept)."""
    from iotvault.devices import register_device

    out = state(cli).out
    with opened(cli) as ctx:
        new = register_device(ctx, type_id, device_id)
    if json_out:
        out.print_json(
            json.dumps({"deviceId": new.device_id, "typeId": new.type_id, "password": new.credential})
        )
    else:
        out.print(f"registered {new.type_id}/{new.device_id}")
        out.print(f"credential (shown once, store it on the device): {new.credential}", highlight=False)


@devices_app.command("list")
def devices_list(cli: typer.Context, json_out: JsonOption = False) -> None:
    """List registered devices."""
    out = state(cli).out
    with opened(cli, read_only=True) as ctx:
        devs = ctx.store.list_devices()
    if json_out:
        out.print_json(
            json.dumps(
                [
                    {
                        "deviceId": d.device_id,
                        "typeId": d.type_id,
                        "status": d.status,
                        "lastSeen": iso_text(d.last_seen_us) if d.last_seen_us else None,
                        "commandDelivery": d.command_delivery,
                    }
                    for d in devs
                ]
            )
        )
        return
    table = Table("deviceId", "typeId", "status", "lastSeen", "commands")
    for d in devs:
        delivery = "unsigned delivery" if d.command_delivery == "unsigned" else d.command_delivery
        table.add_row(d.device_id, d.type_id, d.status, iso_text(d.last_seen_us), delivery)
    out.print(table)


class CommandDeliveryChoice(StrEnum):
    signed = "signed"
    unsigned = "unsigned"


@devices_app.command("set")
def devices_set(
    cli: typer.Context,
    device_id: IdArg,
    command_delivery: Annotated[
        CommandDeliveryChoice,
        typer.Option(
            "--command-delivery",
            help="signed (default, recommended): a JWS the device verifies; unsigned: the payload "
            "as sent, for Watson IoT devices that cannot verify a signature (audited).",
        ),
    ],
    json_out: JsonOption = False,
) -> None:
    """Change a device's settings: how commands reach it."""
    from iotvault.devices import set_command_delivery
    from iotvault.documents import device_doc
    from iotvault.domain.commands import Delivery

    out = state(cli).out
    with opened(cli) as ctx:
        device = set_command_delivery(ctx, device_id, Delivery(command_delivery.value))
    if json_out:
        out.print_json(json.dumps(device_doc(device)))
        return
    if device.command_delivery == Delivery.UNSIGNED:
        out.print(
            f"{device_id}: unsigned delivery — commands go out as sent, without a signature the "
            "device could check; signed delivery is recommended wherever the device can verify",
            highlight=False,
        )
    else:
        out.print(f"{device_id}: signed delivery (commands are signed; the device verifies them)")


class ImportFormat(StrEnum):
    csv = "csv"
    json = "json"


@devices_app.command("import")
def devices_import(
    cli: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="CSV or JSON device list ('-': stdin).")],
    credentials_file: Annotated[
        Path | None,
        typer.Option(
            "--credentials-file",
            help="Write the new credentials here (created with mode 0600; must not exist) instead of "
            "printing them. JSON if the name ends in .json, else CSV.",
        ),
    ] = None,
    fmt: Annotated[
        ImportFormat | None, typer.Option("--format", help="The file's format; guessed from its content.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Register many devices from a CSV or JSON list (a Watson IoT export loads as it is).

    Every device gets a new credential, shown once: printed, or written to --credentials-file.
    Devices already registered with the same type are left as they are (running the import
    again changes nothing); any bad row stops the import before anything is registered.
    """
    from rich.progress import Progress

    from iotvault.devices import import_devices
    from iotvault.domain.device_import import MAX_IMPORT_BYTES, ImportFileError, parse_device_list

    st = state(cli)
    try:
        with sys.stdin.buffer if str(file) == "-" else file.open("rb") as fh:
            data = fh.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        st.err.print(f"iotvault: error: cannot read {file}: {exc.strerror}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    unit = "entry" if fmt == ImportFormat.json or data.lstrip()[:1] in (b"[", b"{") else "line"
    out_file = _credentials_output(st, credentials_file, json_out)
    registered = existing = 0
    try:
        rows = parse_device_list(data, fmt=fmt.value if fmt else None)
        with (
            opened(cli) as ctx,
            out_file as sink,
            Progress(console=st.err, disable=not st.err.is_terminal) as bar,
        ):
            task = bar.add_task("registering", total=len(rows))
            for _row, new in import_devices(ctx, rows, unit=unit):
                bar.advance(task)
                if new is None:
                    existing += 1
                    continue
                registered += 1
                sink.write(new.device_id, new.type_id, new.credential)
    except ImportFileError as exc:
        for n, what in exc.problems:
            place = (
                f"{file}:{n}" if n and exc.unit == "line" else f"{file}: {exc.unit} {n}" if n else f"{file}"
            )
            st.err.print(f"iotvault: error: {place}: {what}", highlight=False, markup=False)
        if credentials_file is not None and registered == 0:
            credentials_file.unlink(missing_ok=True)  # made empty before the registry said no
        st.err.print("nothing was imported", highlight=False)
        raise typer.Exit(1) from None
    summary = {
        "registered": registered,
        "alreadyRegistered": existing,
        "credentialsFile": str(credentials_file or ""),
    }
    if json_out and credentials_file is not None:
        st.out.print_json(json.dumps(summary))
    elif not json_out:
        note = f"; credentials in {credentials_file} (mode 0600)" if credentials_file and registered else ""
        st.err.print(f"registered {registered}, already registered {existing}{note}", highlight=False)


class _Sink:
    """Where new credentials go, each as soon as it is issued, so an import stopped half-way
    loses none: stdout (text, or JSON Lines with --json), or a new 0600 file — a JSON array if
    its name ends in .json, else CSV with formula-like values made harmless."""

    def __init__(self, st: Any, path: Path | None, json_out: bool) -> None:
        self._st = st
        self._path = path
        self._json = json_out if path is None else path.suffix.lower() == ".json"
        self._fh: Any = None
        self._csv: Any = None
        self._first = True

    def __enter__(self) -> _Sink:
        if self._path is not None:
            # O_EXCL: never overwrite (or follow a link planted at) the name; 0600 from the start
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            self._fh = os.fdopen(os.open(self._path, flags, 0o600), "w", encoding="utf-8", newline="")
            if self._json:
                self._fh.write("[")
            else:
                self._csv = csv.writer(self._fh, quoting=csv.QUOTE_ALL)
                self._csv.writerow(["typeId", "deviceId", "credential"])
        return self

    def write(self, device_id: str, type_id: str, credential: str) -> None:
        doc = {"typeId": type_id, "deviceId": device_id, "password": credential}
        if self._fh is None:
            line = json.dumps(doc) if self._json else f"{type_id} {device_id} {credential}"
            self._st.out.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        if self._json:
            self._fh.write(("\n " if self._first else ",\n ") + json.dumps(doc))
            self._first = False
        else:
            self._csv.writerow([spreadsheet_safe(v) for v in (type_id, device_id, credential)])
        self._fh.flush()

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            if self._json:
                self._fh.write("\n]\n")
            self._fh.close()


def _credentials_output(st: Any, path: Path | None, json_out: bool) -> _Sink:
    if path is not None and (path.exists() or path.is_symlink()):
        st.err.print(f"iotvault: error: {path} exists; the credentials file must be new", highlight=False)
        raise typer.Exit(1)
    return _Sink(st, path, json_out)


@devices_app.command("set-type")
def devices_set_type(
    cli: typer.Context,
    type_id: Annotated[str, typer.Argument(metavar="TYPE", help="typeId")],
    command_delivery: Annotated[
        CommandDeliveryChoice,
        typer.Option(
            "--command-delivery",
            help="For the type's devices registered from now on and those registered already: "
            "signed (default, recommended) or unsigned (audited).",
        ),
    ],
    json_out: JsonOption = False,
) -> None:
    """Change a device type's settings: how commands reach its devices."""
    from iotvault.devices import set_type_command_delivery
    from iotvault.domain.commands import Delivery

    out = state(cli).out
    with opened(cli) as ctx:
        changed_ids = set_type_command_delivery(ctx, type_id, Delivery(command_delivery.value))
    if json_out:
        doc = {"typeId": type_id, "commandDelivery": command_delivery.value, "devicesChanged": changed_ids}
        out.print_json(json.dumps(doc))
        return
    word = "unsigned delivery" if command_delivery.value == "unsigned" else "signed delivery"
    out.print(f"type {type_id}: {word}; {len(changed_ids)} registered devices changed", highlight=False)


@devices_app.command("rotate-credential")
def devices_rotate(
    cli: typer.Context,
    device_id: IdArg,
    grace: Annotated[int, typer.Option(min=0, help="Seconds the old credential stays valid.")] = 0,
    json_out: JsonOption = False,
) -> None:
    """Give a device a new credential (printed once)."""
    from iotvault.devices import rotate_device_credential

    out = state(cli).out
    with opened(cli) as ctx:
        cred = rotate_device_credential(ctx, device_id, grace_s=grace)
    if json_out:
        out.print_json(json.dumps({"deviceId": device_id, "password": cred}))
    else:
        out.print(f"new credential for {device_id} (shown once): {cred}", highlight=False)


@devices_app.command("delete")
def devices_delete(cli: typer.Context, device_id: IdArg, yes: YesOption = False) -> None:
    """Delete a device, its events and its data keys (crypto-shredding)."""
    from iotvault.devices import delete_device
    from iotvault.fanout import announce_deleted

    if not yes:
        typer.confirm(f"Delete {device_id}, all its events and its keys? This cannot be undone", abort=True)
    with opened(cli) as ctx:
        delete_device(ctx, device_id)
    s = state(cli).settings
    # running nodes drop its cached keys
    announce_deleted(s.redis_url, s.database_url, device_id, data_dir=s.data_dir)
    state(cli).out.print(f"deleted {device_id}; its data keys are destroyed")


@devices_app.command("command-key")
def devices_command_key(cli: typer.Context, json_out: JsonOption = False) -> None:
    """Print the public key devices verify commands with (PEM; --json adds its kid and JWK)."""
    from iotvault.commands.keys import command_signing_key

    with opened(cli) as ctx:
        key = command_signing_key(ctx.store, ctx.master).public
    if json_out:
        state(cli).out.print_json(
            json.dumps({"kid": key.kid, "alg": "EdDSA", "pem": key.pem(), "jwk": key.jwk()})
        )
        return
    sys.stdout.write(key.pem())


@devices_app.command("revoke-credential")
def devices_revoke_credential(cli: typer.Context, device_id: IdArg, yes: YesOption = False) -> None:
    """Refuse every credential of a device (also one in its grace period) until it is rotated."""
    from iotvault.devices import revoke_device_credential

    if not yes:
        typer.confirm(f"Disconnect {device_id} and refuse its credentials?", abort=True)
    with opened(cli) as ctx:
        revoke_device_credential(ctx, device_id)
    state(cli).out.print(f"revoked the credentials of {device_id}; rotate-credential gives it a new one")


@events_app.command("tail")
def events_tail(
    cli: typer.Context,
    device_id: DeviceArg,
    count: Annotated[int, typer.Option(min=1, max=1000, help="How many of the latest events.")] = 10,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Show a device's latest stored events, decrypted (as the API's event documents)."""
    from iotvault.documents import event_doc
    from iotvault.errors import DeviceNotFoundError

    st = state(cli)
    with opened(cli, read_only=True) as ctx:
        if ctx.store.get_device(device_id) is None:
            raise DeviceNotFoundError(device_id)
        events = list(reversed(ctx.store.last_events(device_id, count)))
        if not events:
            message = "no events stored yet" + ("; waiting for new ones" if follow else "")
            st.err.print(f"{device_id}: {message} ({where(st.settings)})", highlight=False)
        last: str | None = None
        while True:
            for e in events:
                doc = event_doc(ctx.keyring, e)
                if json_out:
                    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
                else:
                    # a text payload as a JSON string: its control characters escaped, so that
                    # a device cannot send escape sequences to the terminal
                    shown = (
                        orjson.dumps(doc["payload"]).decode() if doc["error"] is None else f"({doc['error']})"
                    )
                    if doc.get("payloadEncoding") is not None:
                        shown = f"{e.fmt} ({doc['payloadEncoding']}) {shown}"
                    st.out.print(f"{doc['timestamp']} {e.event_type} {shown}", highlight=False, markup=False)
                last = e.event_id
            sys.stdout.flush()
            if not follow:
                return
            time.sleep(1.0)
            events = (
                ctx.store.events_page(device_id, count=1000, after=last)
                if last
                else list(reversed(ctx.store.last_events(device_id, count)))
            )


def register(app: typer.Typer) -> None:
    app.add_typer(devices_app, name="devices")
    app.add_typer(events_app, name="events")
