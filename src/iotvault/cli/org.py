"""``iotvault org``: the organization id that Watson IoT devices and applications name."""

from __future__ import annotations

import json

import typer

from iotvault.cli.common import JsonOption, opened, state


def org(cli: typer.Context, json_out: JsonOption = False) -> None:
    """Print the organization id of Watson IoT client ids (d:<org>:<type>:<id>, a:<org>:<app>).

    Set it with IOTVAULT_ORG_ID to keep the id a migrated fleet already uses; unset, one is
    made on first use and kept in the database.
    """
    st = state(cli)
    with opened(cli) as ctx:
        org_id = ctx.org_id
        source = "setting" if st.settings.org_id else "database"
    if json_out:
        st.out.print_json(json.dumps({"orgId": org_id, "source": source}))
    else:
        st.out.print(org_id, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(org)
