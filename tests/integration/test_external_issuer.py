"""An external OpenID Connect issuer over real HTTP: discovery, JWKS, rotation, floods, outages.

The issuer is the benchmarks' (:class:`bench.services.Issuer`): a small ``http.server`` in a
thread on 127.0.0.1 that serves its discovery document and JWKS and counts the requests it
gets, so that the tests can check how often iotvault asks.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from bench.services import Issuer
from helpers import free_port
from joserfc import jwt

from iotvault.auth.claims import InvalidTokenError
from iotvault.auth.keys import RemoteJwks
from iotvault.auth.tokens import IssuerConfig, TokenVerifier

pytestmark = pytest.mark.integration

AUDIENCE = "iotvault-api"
DISCOVERY = Issuer.DISCOVERY


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    with Issuer(audience=AUDIENCE) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # no proxies from the environment: the issuer is on this machine
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


def verifier(source: RemoteJwks, issuer: Issuer) -> TokenVerifier:
    return TokenVerifier([IssuerConfig(issuer.url, AUDIENCE, source, groups_claim="roles")])


async def refusal(v: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidTokenError) as info:
        await v.verify(token)
    return info.value.reason


async def test_a_token_verifies_through_discovery_and_jwks(issuer: Issuer, http: httpx.AsyncClient) -> None:
    v = verifier(RemoteJwks(issuer.url, http=http), issuer)
    claims = await v.verify(issuer.token(roles=["field-engineers"]))
    assert (claims.subject, claims.issuer, claims.groups, claims.local) == (
        "ext-user",
        issuer.url,
        ("field-engineers",),
        False,
    )
    await v.verify(issuer.token())
    assert issuer.hits == {DISCOVERY: 1, "/jwks": 1}


async def test_a_rotated_key_verifies_after_one_refresh(issuer: Issuer, http: httpx.AsyncClient) -> None:
    v = verifier(RemoteJwks(issuer.url, http=http, min_refresh_interval_s=0), issuer)
    old_token = issuer.token()
    await v.verify(old_token)
    issuer.rotate()
    assert (await v.verify(issuer.token(kid="key-2"))).subject == "ext-user"
    assert issuer.jwks_fetches == 2
    await v.verify(issuer.token())
    assert issuer.jwks_fetches == 2  # the new key is cached now
    # the old key is gone from the JWKS: its tokens no longer verify
    assert await refusal(v, old_token) == "unknown key"


async def test_a_rotation_is_picked_up_once_the_refresh_interval_has_passed(
    issuer: Issuer, http: httpx.AsyncClient
) -> None:
    v = verifier(RemoteJwks(issuer.url, http=http, min_refresh_interval_s=0.5), issuer)
    await v.verify(issuer.token())
    issuer.rotate()
    new_token = issuer.token()
    assert await refusal(v, new_token) == "unknown key"  # too soon after the last fetch
    assert issuer.jwks_fetches == 1
    await anyio.sleep(0.6)
    assert (await v.verify(new_token)).subject == "ext-user"
    assert issuer.jwks_fetches == 2


@pytest.mark.parametrize("warm", [True, False])
async def test_a_flood_of_unknown_kids_does_not_hammer_the_issuer(
    issuer: Issuer, http: httpx.AsyncClient, warm: bool
) -> None:
    v = verifier(RemoteJwks(issuer.url, http=http), issuer)
    if warm:
        await v.verify(issuer.token())
    reasons: list[str] = []

    async def attack() -> None:
        reasons.append(await refusal(v, issuer.token(kid=secrets.token_urlsafe(12))))

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(attack)
    assert reasons == ["unknown key"] * 100
    assert 1 <= issuer.jwks_fetches <= 2
    assert issuer.hits[DISCOVERY] == issuer.jwks_fetches
    assert (await v.verify(issuer.token())).subject == "ext-user"  # real users are unaffected


@pytest.mark.parametrize("named", ["{url}/", "{url}/other", "https://127.0.0.1", "http://localhost:{port}"])
async def test_a_discovery_document_naming_another_issuer_is_refused(
    issuer: Issuer, http: httpx.AsyncClient, named: str
) -> None:
    issuer.named_issuer = named.format(url=issuer.url, port=issuer.server.server_address[1])
    v = verifier(RemoteJwks(issuer.url, http=http), issuer)
    assert await refusal(v, issuer.token()) == "issuer keys unavailable"
    assert issuer.hits[DISCOVERY] == 1
    assert issuer.jwks_fetches == 0


async def test_an_issuer_that_is_down_refuses_tokens_cleanly(issuer: Issuer) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    v = TokenVerifier([IssuerConfig(url, AUDIENCE, RemoteJwks(url))])  # RemoteJwks's own client
    token = jwt.encode(
        {"alg": "ES256", "kid": "key-1"},
        {"iss": url, "sub": "u", "aud": AUDIENCE, "exp": int(time.time()) + 60},
        issuer.key,
    )
    assert await refusal(v, token) == "issuer keys unavailable"
    assert await refusal(v, token) == "issuer keys unavailable"  # and quickly: no new attempt yet


async def test_an_issuer_that_goes_down_keeps_its_known_keys(issuer: Issuer, http: httpx.AsyncClient) -> None:
    v = verifier(RemoteJwks(issuer.url, http=http, cache_ttl_s=0, min_refresh_interval_s=0), issuer)
    token = issuer.token()
    await v.verify(token)
    issuer.server.shutdown()
    issuer.server.server_close()
    assert (await v.verify(token)).subject == "ext-user"
    assert await refusal(v, issuer.token(kid="key-9")) == "unknown key"
