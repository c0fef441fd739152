"""``iotvault db upgrade``, ``iotvault keys rotate`` and ``iotvault certs``: schema, keys, TLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from iotvault.cli.common import CliState, JsonOption, iso_text, opened, state

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="Encryption keys.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(cli: typer.Context) -> None:
    """Create the schema or upgrade it to this version's revision."""
    from iotvault.storage import migrate
    from iotvault.storage.db import check_connection, create_db_engine, redact

    st = state(cli)
    s = st.settings
    url = s.effective_database_url
    engine = create_db_engine(url, sqlite_synchronous=s.sqlite_synchronous)
    try:
        check_connection(engine, url)
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    st.out.print(f"{redact(url)}: schema {before or 'none'} -> {after}")


@keys_app.command("rotate")
def keys_rotate(
    cli: typer.Context,
    reencrypt: Annotated[bool, typer.Option(help="Also rewrite stored events under the new keys.")] = False,
    signing: Annotated[
        bool,
        typer.Option(
            "--signing",
            help="Rotate the OpenID Connect token-signing key instead of the device data keys; "
            "the old key stays in the JWKS until the tokens it signed have expired.",
        ),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Start a new data-key version for every device (old events stay readable), or with
    --signing a new token-signing key for the OpenID Connect provider."""
    from iotvault.datakeys import reencrypt_events, rotate_data_keys

    if signing and reencrypt:
        raise typer.BadParameter("--signing rotates the token-signing key only; run --reencrypt on its own")
    st = state(cli)
    if signing:
        _rotate_signing_key(cli, st, json_out)
        return
    with opened(cli) as ctx:
        versions = rotate_data_keys(ctx)
        rewritten = 0
        if reencrypt:
            with Progress(
                TextColumn("[bold]re-encrypt"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=st.err,
            ) as progress:
                task = progress.add_task("events", total=ctx.store.count_events())
                rewritten = reencrypt_events(ctx, list(versions), lambda n: progress.advance(task, n))
    if json_out:
        st.out.print_json(json.dumps({"devices": versions, "reencrypted": rewritten}))
    else:
        st.out.print(
            f"rotated the data keys of {len(versions)} devices"
            + (f"; re-encrypted {rewritten} events" if reencrypt else "")
        )


def _rotate_signing_key(cli: typer.Context, st: CliState, json_out: bool) -> None:
    from iotvault.identity import IdentityProvider

    with opened(cli) as ctx:
        provider = IdentityProvider(ctx.settings, ctx)
        kid, retired, until = provider.keys.rotate()
        provider.housekeeping(force=True)  # drops keys whose tokens have all expired
    if json_out:
        st.out.print_json(
            json.dumps({"signing": {"kid": kid, "retired": retired, "publishedUntil": iso_text(until)}})
        )
        return
    st.out.print(f"token-signing key {kid} signs from now on", highlight=False)
    if retired:
        st.out.print(f"{', '.join(retired)} stay published until {iso_text(until)}", highlight=False)


def certs(
    cli: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", file_okay=False, help="Where to write ca.pem, ca.key, server.pem, server.key."
        ),
    ],
    host: Annotated[
        list[str], typer.Option("--host", help="A host name or IP address the broker is reached at (repeat).")
    ],
    days: Annotated[
        int, typer.Option(min=1, max=825, help="Validity of the server certificate, in days.")
    ] = 397,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing server certificate.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Make a private CA (or reuse the one in DIR) and a TLS server certificate for the MQTT broker."""
    from iotvault.certs import write_certs

    out = state(cli).out
    files = write_certs(directory, host, days=days, force=force)
    if json_out:
        doc = {k: str(getattr(files, k)) for k in ("ca_cert", "ca_key", "server_cert", "server_key")}
        out.print_json(json.dumps({**doc, "caCreated": files.ca_created}))
        return
    out.print(f"{'created' if files.ca_created else 'reused'} the CA: {files.ca_cert} (key {files.ca_key})")
    out.print(f"server certificate for {', '.join(host)}: {files.server_cert} (key {files.server_key})")
    out.print("give ca.pem to devices and set IOTVAULT_BROKER_CA_FILE to it; keep ca.key offline")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.add_typer(keys_app, name="keys")
    app.command()(certs)
