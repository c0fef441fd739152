"""``iotvault groups …``: roles on a list of devices, and their members."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Column, Table

from iotvault import accounts as account_services
from iotvault.cli.common import (
    CliState,
    DeviceArg,
    GroupArg,
    JsonOption,
    NameArg,
    UserArg,
    YesOption,
    opened,
    roles_text,
    state,
)
from iotvault.documents import group_doc
from iotvault.domain.accounts import Roles
from iotvault.storage.accounts import GroupNotFoundError

if TYPE_CHECKING:
    from iotvault.context import Context

groups_app = typer.Typer(help="Groups: roles on a list of devices, and their members.", no_args_is_help=True)


def warn_unregistered(st: CliState, ctx: Context, device_ids: Iterable[str]) -> None:
    """A group may name a device before it is registered; say so, a typo looks the same."""
    for device_id in device_ids:
        if ctx.store.get_device(device_id) is None:
            st.warn(f"device {device_id!r} is not registered (yet); the group grants it once it is")


@groups_app.command("add")
def groups_add(
    cli: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="groupName")],
    display_name: Annotated[str | None, typer.Option(help="Display name (default: NAME).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="roleAdmin: manage accounts and devices.")] = False,
    reader: Annotated[bool, typer.Option("--reader", help="roleReader: read the group's devices.")] = False,
    writer: Annotated[
        bool, typer.Option("--writer", help="roleWriter: command the group's devices.")
    ] = False,
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="A deviceId (repeat).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Create a group giving its roles on its devices to its members."""
    st = state(cli)
    with opened(cli) as ctx:
        group = account_services.create_group(
            ctx, name, display_name, roles=Roles(admin, reader, writer), devices=device or []
        )
        warn_unregistered(st, ctx, group.devices)
    if json_out:
        st.out.print_json(json.dumps(group_doc(group)))
    else:
        st.out.print(
            f"created group {group.group_name} "
            f"(roles: {roles_text(group.roles)}; {len(group.devices)} devices)"
        )


@groups_app.command("list")
def groups_list(cli: typer.Context, json_out: JsonOption = False) -> None:
    """List groups with their roles, devices and members."""
    out = state(cli).out
    with opened(cli, read_only=True) as ctx:
        groups = ctx.accounts.list_groups()
    if json_out:
        out.print_json(json.dumps([group_doc(g) for g in groups]))
        return
    table = Table(Column("groupName", overflow="fold"), "displayName", "roles", "devices", "members")
    for g in groups:
        table.add_row(
            g.group_name, g.display_name, roles_text(g.roles), ", ".join(g.devices), ", ".join(g.members)
        )
    out.print(table)


@groups_app.command("delete")
def groups_delete(cli: typer.Context, name: NameArg, yes: YesOption = False) -> None:
    """Delete a group: its members lose what it granted; API keys that named it forget it."""
    if not yes:
        typer.confirm(f"Delete group {name}?", abort=True)
    with opened(cli) as ctx:
        account_services.delete_group(ctx, name)
    state(cli).out.print(f"deleted group {name}")


def _change_group(
    cli: typer.Context,
    change: Callable[[Context, str, str], bool],
    group: str,
    item: str,
    *,
    adding: bool,
    device: bool = False,
) -> None:
    """Add a member or device to a group, or take it out; say whether anything changed."""
    st = state(cli)
    with opened(cli) as ctx:
        changed = change(ctx, group, item)
        if adding and device:
            warn_unregistered(st, ctx, [item])
    if adding:
        outcome = "added to" if changed else "was already in"
    else:
        outcome = "removed from" if changed else "was not in"
    st.out.print(f"{item} {outcome} {group}")


@groups_app.command("add-member")
def groups_add_member(cli: typer.Context, group: GroupArg, user: UserArg) -> None:
    """Add a user to a group."""
    _change_group(cli, account_services.add_member, group, user, adding=True)


@groups_app.command("remove-member")
def groups_remove_member(cli: typer.Context, group: GroupArg, user: UserArg) -> None:
    """Remove a user from a group."""
    _change_group(cli, account_services.remove_member, group, user, adding=False)


@groups_app.command("add-device")
def groups_add_device(cli: typer.Context, group: GroupArg, device_id: DeviceArg) -> None:
    """Give a group's roles on a device (a warning if it is not registered yet)."""
    _change_group(cli, account_services.add_group_device, group, device_id, adding=True, device=True)


@groups_app.command("remove-device")
def groups_remove_device(cli: typer.Context, group: GroupArg, device_id: DeviceArg) -> None:
    """Take a device out of a group."""
    _change_group(cli, account_services.remove_group_device, group, device_id, adding=False)


@groups_app.command("set-roles")
def groups_set_roles(
    cli: typer.Context,
    group: GroupArg,
    admin: Annotated[bool | None, typer.Option("--admin/--no-admin", help="roleAdmin.")] = None,
    reader: Annotated[bool | None, typer.Option("--reader/--no-reader", help="roleReader.")] = None,
    writer: Annotated[bool | None, typer.Option("--writer/--no-writer", help="roleWriter.")] = None,
) -> None:
    """Change a group's roles; roles not named stay as they are."""
    with opened(cli) as ctx:
        current = ctx.accounts.get_group(group)
        if current is None:
            raise GroupNotFoundError(group)
        roles = current.roles.changed(admin=admin, reader=reader, writer=writer)
        updated = account_services.update_group(ctx, group, roles=roles)
    state(cli).out.print(f"roles of {group}: {roles_text(updated.roles)}")


def register(app: typer.Typer) -> None:
    app.add_typer(groups_app, name="groups")
