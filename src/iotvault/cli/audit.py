"""``iotvault audit verify | tail | export``: check the chain, follow it, hand it to a SIEM.

``verify`` exits 0 when every record and checkpoint holds, 1 naming the first record that does
not (altered, missing, out of order, or a tail cut off behind a signed checkpoint). It prints
the public key the checkpoints are verified with: keep a copy outside the database and compare.
Administrative commands of the CLI that change something record themselves with actor ``cli``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from iotvault.cli.common import JsonOption, opened, state

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


def _doc(record: Any) -> dict[str, Any]:
    from iotvault.api.routes.audit import audit_doc

    return audit_doc(record)


@audit_app.command("verify")
def verify(
    cli: typer.Context,
    checkpoints: Annotated[
        Path | None,
        typer.Option(
            "--checkpoints",
            exists=True,
            dir_okay=False,
            help="Also check the signed heads exported to this file (IOTVAULT_AUDIT_EXPORT_FILE).",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Check the whole chain and its signed checkpoints; exit 1 at the first bad record."""
    from iotvault.audit.log import read_exported, verify_log
    from iotvault.storage.audit import AuditStore

    st = state(cli)
    with opened(cli, read_only=True) as ctx:
        public_key = ctx.audit.public_key
        store = AuditStore(ctx.engine, ctx.settings.effective_database_url)
        extra = read_exported(checkpoints) if checkpoints else []
        verdict = verify_log(store, public_key, extra)
    if json_out:
        doc = {
            "ok": verdict.ok,
            "checked": verdict.checked,
            "head": verdict.head.seq,
            "firstBadRecord": verdict.bad_seq,
            "reason": verdict.reason,
            "publicKey": public_key,
        }
        st.out.print_json(json.dumps(doc))
    elif verdict.ok:
        st.out.print(
            f"audit log intact: {verdict.checked} records checked, head {verdict.head.seq}; "
            f"checkpoint key {public_key}",
            highlight=False,
        )
    else:
        st.err.print(f"audit log NOT intact at record {verdict.bad_seq}: {verdict.reason}", highlight=False)
    if not verdict.ok:
        raise typer.Exit(1)


@audit_app.command("tail")
def tail(
    cli: typer.Context,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000, help="How many records.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records.")] = False,
) -> None:
    """Print the newest records (JSON lines, oldest first), and with --follow the new ones."""
    from iotvault.storage.audit import AuditFilter, AuditStore

    st = state(cli)
    with opened(cli, read_only=True) as ctx:
        store = AuditStore(ctx.engine, ctx.settings.effective_database_url)
        page = list(reversed(store.query(AuditFilter(), limit=count)))
        if not page and not follow:
            st.err.print("the audit log has no records yet")
        for record in page:
            st.out.print(json.dumps(_doc(record)), highlight=False, soft_wrap=True)
        last = page[-1].seq if page else 0
        while follow:
            time.sleep(1.0)
            for record in store.records(from_seq=last + 1):
                st.out.print(json.dumps(_doc(record)), highlight=False, soft_wrap=True)
                last = record.seq


@audit_app.command("export")
def export(
    cli: typer.Context,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="JSON lines, one record per line (the only format).")
    ] = True,
    since_seq: Annotated[int, typer.Option("--since-seq", min=0, help="Start after this record.")] = 0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", dir_okay=False, help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Every record after --since-seq, oldest first, as JSON lines (for a SIEM)."""
    from iotvault.storage.audit import AuditStore

    if not jsonl:
        raise typer.BadParameter("JSON lines is the only export format", param_hint="--jsonl")
    st = state(cli)
    written = 0
    with opened(cli, read_only=True) as ctx:
        store = AuditStore(ctx.engine, ctx.settings.effective_database_url)
        out = output.open("w", encoding="utf-8") if output else None
        try:
            for record in store.records(from_seq=since_seq + 1):
                line = json.dumps(_doc(record), ensure_ascii=False)
                if out is not None:
                    out.write(line + "\n")
                else:
                    st.out.print(line, highlight=False, soft_wrap=True)
                written += 1
        finally:
            if out is not None:
                out.close()
    if output is not None:
        st.err.print(f"{written} records written to {output}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
