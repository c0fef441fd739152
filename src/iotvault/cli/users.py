"""``iotvault users …``: people who log in."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Column, Table

from iotvault import accounts as account_services
from iotvault.cli.common import (
    JsonOption,
    NameArg,
    PasswordStdinOption,
    YesOption,
    iso_text,
    opened,
    password_from_stdin,
    state,
)
from iotvault.documents import user_doc

users_app = typer.Typer(
    help="People who log in: passwords (argon2id), attributes, groups.", no_args_is_help=True
)


def _attributes(pairs: list[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--attribute")
        attrs[key] = value
    return attrs


@users_app.command("add")
def users_add(
    cli: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="userName")],
    display_name: Annotated[str | None, typer.Option(help="Display name (default: NAME).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="A group to join (repeat).")
    ] = None,
    attribute: Annotated[
        list[str] | None, typer.Option("--attribute", "-a", help="KEY=VALUE, e.g. Language=en (repeat).")
    ] = None,
    password_stdin: PasswordStdinOption = False,
    json_out: JsonOption = False,
) -> None:
    """Create a user; prints its generated password once (unless given on stdin)."""
    out = state(cli).out
    given = password_from_stdin() if password_stdin else None
    attrs = _attributes(attribute or [])
    with opened(cli) as ctx:
        password = account_services.create_user(
            ctx, name, display_name, password=given, attributes=attrs, groups=group or []
        )
        user = ctx.accounts.get_user(name)
    assert user is not None  # noqa: S101 - just made
    if json_out:
        doc = user_doc(user)
        if given is None:
            doc["password"] = password
        out.print_json(json.dumps(doc))
        return
    out.print(f"created user {user.user_name}" + (f" in {', '.join(user.groups)}" if user.groups else ""))
    if given is None:
        out.print(f"password (shown once): {password}", highlight=False)


@users_app.command("list")
def users_list(cli: typer.Context, json_out: JsonOption = False) -> None:
    """List users (never their passwords)."""
    out = state(cli).out
    with opened(cli, read_only=True) as ctx:
        users = ctx.accounts.list_users()
    if json_out:
        out.print_json(json.dumps([user_doc(u) for u in users]))
        return
    table = Table(Column("userName", overflow="fold"), "displayName", "groups", "disabled", "created")
    for u in users:
        table.add_row(
            u.user_name,
            u.display_name,
            ", ".join(u.groups),
            "yes" if u.disabled else "",
            iso_text(u.created_us),
        )
    out.print(table)


def _set_disabled(cli: typer.Context, name: str, *, disabled: bool) -> None:
    with opened(cli) as ctx:
        account_services.update_user(ctx, name, disabled=disabled)
    state(cli).out.print(f"{'disabled' if disabled else 'enabled'} {name}")


@users_app.command("disable")
def users_disable(cli: typer.Context, name: NameArg) -> None:
    """Refuse the user's logins until it is enabled again."""
    _set_disabled(cli, name, disabled=True)


@users_app.command("enable")
def users_enable(cli: typer.Context, name: NameArg) -> None:
    """Allow a disabled user to log in again."""
    _set_disabled(cli, name, disabled=False)


@users_app.command("set-password")
def users_set_password(
    cli: typer.Context,
    name: NameArg,
    password_stdin: PasswordStdinOption = False,
    json_out: JsonOption = False,
) -> None:
    """Set a user's password: from stdin, or generated and printed once."""
    out = state(cli).out
    with opened(cli) as ctx:
        if password_stdin:
            account_services.set_password(ctx, name, password_from_stdin())
            password = None
        else:
            password = account_services.reset_password(ctx, name)
    if json_out:
        out.print_json(json.dumps({"userName": name, **({"password": password} if password else {})}))
    elif password is None:
        out.print(f"password of {name} changed")
    else:
        out.print(f"new password of {name} (shown once): {password}", highlight=False)


@users_app.command("delete")
def users_delete(cli: typer.Context, name: NameArg, yes: YesOption = False) -> None:
    """Delete a user and its group memberships."""
    if not yes:
        typer.confirm(f"Delete user {name}?", abort=True)
    with opened(cli) as ctx:
        account_services.delete_user(ctx, name)
    state(cli).out.print(f"deleted user {name}")


def register(app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")
