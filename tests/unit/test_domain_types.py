"""One source for each rule: the Annotated types the API uses agree with the domain's checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import TypeAdapter, ValidationError

from iotvault.api.routes.admin import DeviceCreate, UserCreate
from iotvault.api.routes.oidc_admin import ClientCreate
from iotvault.domain.accounts import MAX_PASSWORD, MIN_PASSWORD, check_name, check_password
from iotvault.domain.ids import check_identifier
from iotvault.domain.types import AccountName, Identifier, Password
from iotvault.errors import ValidationError as DomainError

SAMPLES = [
    "a", "kitchen-1", "A.b_c-9", "x" * 64, "x" * 65, "", "a b", "a/b", "a+b", "a#", "a\n", "\na",
    "user@example.org", "é", "a\x00", "\uff4b",
]  # fmt: skip


def accepts(check: Callable[[str], object], value: str) -> bool:
    try:
        check(value)
    except DomainError:
        return False
    return True


def adapter_accepts(adapter: TypeAdapter[str], value: str) -> bool:
    try:
        adapter.validate_python(value)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("value", SAMPLES)
def test_identifier_type_and_domain_check_agree(value: str) -> None:
    domain = accepts(lambda v: check_identifier("deviceId", v), value)
    assert adapter_accepts(TypeAdapter(Identifier), value) is domain


@pytest.mark.parametrize("value", SAMPLES)
def test_account_name_type_and_domain_check_agree(value: str) -> None:
    domain = accepts(lambda v: check_name("userName", v), value)
    assert adapter_accepts(TypeAdapter(AccountName), value) is domain


@pytest.mark.parametrize("length", [MIN_PASSWORD - 1, MIN_PASSWORD, 256, 257, MAX_PASSWORD, MAX_PASSWORD + 1])
def test_password_limits_are_the_domain_s(length: int) -> None:
    value = "p" * length
    assert adapter_accepts(TypeAdapter(Password), value) is accepts(check_password, value)


def test_the_api_bodies_carry_the_domain_rules() -> None:
    user = UserCreate.model_json_schema()["properties"]
    password = next(s for s in user["password"]["anyOf"] if s.get("type") == "string")
    assert (password["minLength"], password["maxLength"]) == (MIN_PASSWORD, MAX_PASSWORD)
    identifier = TypeAdapter(Identifier).json_schema()["pattern"]
    assert user["userName"]["pattern"] == TypeAdapter(AccountName).json_schema()["pattern"]
    assert DeviceCreate.model_json_schema()["properties"]["deviceId"]["pattern"] == identifier
    assert ClientCreate.model_json_schema()["properties"]["clientId"]["pattern"] == identifier
