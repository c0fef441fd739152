"""Bearer token verification: every rule of iotvault.auth.tokens, and the attacks each defeats.

Tokens are minted here by hand (header and payload encoded, then signed with joserfc's
algorithm models), so that tests can build exactly the hostile headers and payloads a real
signer would refuse to produce.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, Literal

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeySet, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from iotvault.auth.claims import InvalidTokenError, TokenClaims
from iotvault.auth.keys import RemoteJwks, StaticKeys, pinned_algorithm, public_keyset
from iotvault.auth.tokens import MAX_TOKEN_LENGTH, IssuerConfig, TokenVerifier
from iotvault.errors import ConfigError, ValidationError

ISSUER = "https://issuer.example"
OTHER_ISSUER = "https://other.example"
AUDIENCE = "iotvault-api"
CLIENT_ID = "mobile-app"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RemoteJwks serializes refreshes with an asyncio.Lock


# ---- the test helper: keys and tokens --------------------------------------------------------
KeyKind = Literal["EC", "RSA", "OKP"]
DROP: Any = object()  # a header or claim value meaning "leave this member out"
PINNED = {"EC": "ES256", "RSA": "RS256", "OKP": "EdDSA"}


def new_signing_key(kind: KeyKind, kid: str) -> Key:
    """A private signing key of the kind iotvault accepts: EC P-256, RSA 2048 or Ed25519."""
    params = {"kid": kid}
    if kind == "EC":
        return ECKey.generate_key("P-256", parameters=params)
    if kind == "RSA":
        return RSAKey.generate_key(2048, parameters=params)
    return OKPKey.generate_key("Ed25519", parameters=params)


@cache
def signing_key(kind: KeyKind, kid: str | None = None) -> Key:
    """One key per (kind, kid) for the whole run: RSA generation is slow."""
    return new_signing_key(kind, kid or f"{kind.lower()}-1")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def access_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "scope": "openid devices:read",
        "preferred_username": "alice",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not DROP}


def id_claims(**overrides: Any) -> dict[str, Any]:
    return access_claims(**{"aud": CLIENT_ID, "scope": DROP, "nonce": "n-0S6", **overrides})


def mint(
    key: Key,
    claims: Mapping[str, Any] | str | None = None,
    *,
    alg: str | None = None,
    **header: Any,
) -> str:
    """A JWS compact token signed with ``key``. ``claims`` may be raw JSON text; header
    members given as keywords override the defaults (``DROP`` removes one)."""
    alg = alg or PINNED[key.key_type]
    fields: dict[str, Any] = {"alg": alg, "typ": "at+jwt", "kid": key.kid, **header}
    fields = {name: value for name, value in fields.items() if value is not DROP}
    payload = claims if isinstance(claims, str) else json.dumps(access_claims() if claims is None else claims)
    signing_input = f"{b64json(fields)}.{b64(payload.encode())}"
    signature = JWSRegistry.algorithms[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def mint_id(key: Key, claims: Mapping[str, Any] | None = None, **header: Any) -> str:
    """An ID token, as the seed's clients send after the access token."""
    return mint(key, id_claims() if claims is None else claims, **({"typ": "JWT"} | header))


# ---- fixtures -----------------------------------------------------------------------------
class CountingKeys:
    """A key source that counts the refreshes it is asked for."""

    def __init__(self, *keys: Key) -> None:
        self.keyset = public_keyset(KeySet(list(keys)))
        self.refreshes = 0

    async def keys(self, *, refresh: bool = False) -> KeySet:
        self.refreshes += refresh
        return self.keyset


def verifier_for(*keys: Key, **config: Any) -> TokenVerifier:
    source = StaticKeys(public_keyset(KeySet(list(keys))))
    return TokenVerifier([IssuerConfig(ISSUER, AUDIENCE, source, **config)])


@pytest.fixture
def verifier() -> TokenVerifier:
    return verifier_for(signing_key("EC"), signing_key("RSA"), signing_key("OKP"))


async def refusal(verifier: TokenVerifier, token: Any, id_token: Any = None) -> str:
    with pytest.raises(InvalidTokenError) as info:
        await verifier.verify(token, id_token)
    return info.value.reason


# ---- valid tokens -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["EC", "RSA", "OKP"])
async def test_a_valid_token_of_each_key_type_verifies(verifier: TokenVerifier, kind: KeyKind) -> None:
    claims = access_claims(groups=["operators", "readers"], amr=["pwd"])
    result = await verifier.verify(mint(signing_key(kind), claims))
    assert result == TokenClaims(
        subject="user-1",
        issuer=ISSUER,
        audience=(AUDIENCE,),
        expires_at=claims["exp"],
        groups=("operators", "readers"),
        anonymous=False,
        scopes=("openid", "devices:read"),
        user_name="alice",
        local=False,
        claims=claims,
    )
    assert dict(result.claims) == claims


async def test_a_token_made_by_joserfc_jwt_encode_verifies(verifier: TokenVerifier) -> None:
    # what the built-in provider will most likely call
    key = signing_key("EC")
    token = jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "at+jwt"}, access_claims(), key)
    assert (await verifier.verify(token)).subject == "user-1"


async def test_the_verified_claims_are_read_only(verifier: TokenVerifier) -> None:
    result = await verifier.verify(mint(signing_key("EC")))
    with pytest.raises(TypeError):
        result.claims["sub"] = "admin"  # type: ignore[index]


async def test_local_is_the_issuer_configs_flag() -> None:
    key = signing_key("EC")
    local = verifier_for(key, local=True)
    assert (await local.verify(mint(key))).local is True
    assert (await verifier_for(key).verify(mint(key))).local is False


# ---- algorithms ---------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_refused(verifier: TokenVerifier, alg: str) -> None:
    signing_input = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(access_claims())}"
    assert await refusal(verifier, signing_input + ".") == "malformed token"  # no signature at all
    assert await refusal(verifier, signing_input + "." + b64(b"x")) == "algorithm not allowed"


@pytest.mark.parametrize("kind", ["RSA", "EC", "OKP"])
@pytest.mark.parametrize("secret_form", ["pem", "jwk"])
@pytest.mark.parametrize("with_kid", [True, False])
async def test_hs256_signed_with_the_public_key_as_hmac_secret_is_refused(
    verifier: TokenVerifier, kind: KeyKind, secret_form: str, with_kid: bool
) -> None:
    """The classic key-confusion forgery: everything an attacker needs is public."""
    public = public_keyset(KeySet([signing_key(kind)])).keys[0]
    secret = public.as_pem() if secret_form == "pem" else json.dumps(public.as_dict()).encode()
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": public.kid} if with_kid else {})
    signing_input = f"{b64json(header)}.{b64json(access_claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert await refusal(verifier, f"{signing_input}.{b64(mac)}") == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "PS512"])
async def test_other_rsa_algorithms_are_refused_even_when_genuinely_signed(
    verifier: TokenVerifier, alg: str
) -> None:
    # the signature is valid for the RSA key; only the pin (RSA → RS256) refuses it
    assert await refusal(verifier, mint(signing_key("RSA"), alg=alg)) == "algorithm not allowed"


@pytest.mark.parametrize(
    ("kind", "alg"), [("RSA", "ES256"), ("EC", "RS256"), ("EC", "EdDSA"), ("OKP", "ES256")]
)
async def test_a_header_alg_that_is_not_the_keys_pin_is_refused(
    verifier: TokenVerifier, kind: KeyKind, alg: str
) -> None:
    # an ES256 header naming the RSA key's kid, etc.: signed by some other key of that type
    other = {
        "ES256": signing_key("EC", "x"),
        "RS256": signing_key("RSA", "x"),
        "EdDSA": signing_key("OKP", "x"),
    }
    token = mint(other[alg], alg=alg, kid=signing_key(kind).kid)
    assert await refusal(verifier, token) == "algorithm does not match the key"


async def test_keys_iotvault_does_not_use_verify_nothing() -> None:
    p384 = ECKey.generate_key("P-384", parameters={"kid": "p384"})
    v = verifier_for(p384, signing_key("EC"))
    assert pinned_algorithm(public_keyset(KeySet([p384])).keys[0]) is None
    assert await refusal(v, mint(p384, alg="ES384")) == "algorithm not allowed"
    assert await refusal(v, mint(p384, alg="ES256")) == "algorithm does not match the key"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "ES256"),
        ({"alg": "ES256"}, "ES256"),
        ({"alg": "ES384"}, None),
        ({"use": "enc"}, None),
        ({"key_ops": ["verify"]}, "ES256"),
        ({"key_ops": ["encrypt"]}, None),
    ],
)
def test_a_keys_own_alg_use_and_key_ops_must_agree_with_its_pin(
    params: dict[str, Any], expected: str | None
) -> None:
    public = signing_key("EC").as_dict(private=False)
    assert pinned_algorithm(ECKey.import_key({**public, **params})) == expected


# ---- kid and key headers ------------------------------------------------------------------
@pytest.mark.parametrize("member", ["jwk", "jku", "x5u", "x5c"])
async def test_a_token_that_carries_or_points_to_its_own_key_is_refused(
    verifier: TokenVerifier, member: str
) -> None:
    attacker = new_signing_key("EC", "attacker")
    value: Any = {
        "jwk": attacker.as_dict(private=False),
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": ["MIIBszCCAVmgAwIBAgIUQ=="],
    }[member]
    assert await refusal(verifier, mint(attacker, **{member: value})) == "header carries a key"
    # also when it names a configured kid, hoping to be verified with the embedded key
    token = mint(attacker, kid=signing_key("EC").kid, **{member: value})
    assert await refusal(verifier, token) == "header carries a key"


async def test_an_embedded_jwk_is_not_trusted_even_if_the_header_check_were_absent(
    verifier: TokenVerifier,
) -> None:
    # without the header member, the attacker's own key is simply unknown
    attacker = new_signing_key("EC", "attacker")
    assert await refusal(verifier, mint(attacker)) == "unknown key"
    assert await refusal(verifier, mint(attacker, kid=DROP)) == "bad signature"
    assert await refusal(verifier, mint(attacker, kid=signing_key("EC").kid)) == "bad signature"


@pytest.mark.parametrize(
    ("kid", "reason"),
    [
        ("k" * 257, "malformed key id"),
        ("x" * 5000, "malformed token"),  # the header alone is larger than any real one
        ("", "malformed key id"),
        ("../../../../etc/passwd", "unknown key"),
        ("ec-1/../ec-1", "unknown key"),
        ("' OR '1'='1' --", "malformed key id"),
        ("ec-1';DROP/**/TABLE/**/keys;--", "unknown key"),
        ("ec-1\u0000", "malformed key id"),
        ("ec-1\n", "malformed key id"),
        ("ëc-1", "malformed key id"),
        (123, "malformed key id"),
        (1.5, "malformed key id"),
        (True, "malformed key id"),
        (None, "malformed key id"),
        (["ec-1"], "malformed key id"),
        ({"kid": "ec-1"}, "malformed key id"),
    ],
)
async def test_hostile_kids_are_refused(verifier: TokenVerifier, kid: Any, reason: str) -> None:
    token = mint(signing_key("EC"), kid=kid)  # correctly signed: only the kid is wrong
    assert await refusal(verifier, token) == reason


@pytest.mark.parametrize("kid", ["EC-1", "ec-", "ec-10", "ec-1/", "Ec-1", "ec_1"])
async def test_kid_matches_exactly(kid: str) -> None:
    key = signing_key("EC")
    assert await refusal(verifier_for(key), mint(key, kid=kid)) == "unknown key"


@pytest.mark.parametrize("kid", ["ec-1 ", " ec-1", "ec-1\t"])
async def test_kids_with_blanks_are_malformed(kid: str) -> None:
    key = signing_key("EC")
    assert await refusal(verifier_for(key), mint(key, kid=kid)) == "malformed key id"


async def test_without_kid_each_key_of_the_headers_type_is_tried() -> None:
    ec1, ec2, rsa_key = signing_key("EC"), signing_key("EC", "ec-2"), signing_key("RSA")
    v = verifier_for(ec1, rsa_key, ec2)
    assert (await v.verify(mint(ec2, kid=DROP))).subject == "user-1"
    assert (await v.verify(mint(rsa_key, kid=DROP))).subject == "user-1"
    assert await refusal(v, mint(new_signing_key("EC", "x"), kid=DROP)) == "bad signature"
    assert await refusal(verifier_for(ec1), mint(rsa_key, kid=DROP)) == "unknown key"


async def test_an_unknown_kid_asks_the_key_source_for_a_refresh_once() -> None:
    source = CountingKeys(signing_key("EC"))
    v = TokenVerifier([IssuerConfig(ISSUER, AUDIENCE, source)])
    await v.verify(mint(signing_key("EC")))
    assert source.refreshes == 0
    assert await refusal(v, mint(new_signing_key("EC", "rotated"))) == "unknown key"
    assert source.refreshes == 1


async def test_a_tampered_token_is_refused(verifier: TokenVerifier) -> None:
    header, _payload, signature = mint(signing_key("EC")).split(".")
    forged = f"{header}.{b64json(access_claims(sub='admin'))}.{signature}"
    assert await refusal(verifier, forged) == "bad signature"
    assert await refusal(verifier, f"{header}.{_payload}.{b64(b'0' * 64)}") == "bad signature"


@pytest.mark.parametrize("member", ["crit", "b64", "enc", "zip"])
async def test_headers_that_change_the_meaning_of_the_token_are_refused(
    verifier: TokenVerifier, member: str
) -> None:
    value = {"crit": ["exp"], "b64": False, "enc": "A256GCM", "zip": "DEF"}[member]
    assert await refusal(verifier, mint(signing_key("EC"), **{member: value})) == "unsupported header"


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", "application/jwt", DROP])
async def test_accepted_token_types(verifier: TokenVerifier, typ: Any) -> None:
    assert (await verifier.verify(mint(signing_key("EC"), typ=typ))).subject == "user-1"


@pytest.mark.parametrize("typ", ["dpop+jwt", "JWE", "secevent+jwt", "", 1, None])
async def test_other_token_types_are_refused(verifier: TokenVerifier, typ: Any) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), typ=typ)) == "wrong token type"


# ---- structure ----------------------------------------------------------------------------
TRUNCATED_JSON = b64(b'{"alg":"ES256"')
NOT_UTF8 = b64(b"\xff\xfe{}")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",  # the JWE compact form
        "..",
        "@@@.@@@.@@@",
        "a=.b.c",
        "é.b.c",
        "Zm9v.YmFy.YmF6",  # base64 of text that is not JSON
        f"{b64json([1, 2])}.{b64json({})}.{b64(b'sig')}",  # a header that is not an object
        f"{TRUNCATED_JSON}.{b64json({})}.{b64(b'sig')}",
        f"{NOT_UTF8}.{b64json({})}.{b64(b'sig')}",
        f"{b64(json.dumps({'alg': 'ES256'}).encode('utf-16'))}.{b64json({})}.{b64(b'sig')}",
        f"{b64json({'alg': 'ES256'})}a.{b64json({})}.{b64(b'sig')}",  # impossible base64 length
        None,
        123,
        b"a.b.c",
    ],
)
async def test_malformed_tokens_are_refused(verifier: TokenVerifier, token: Any) -> None:
    assert await refusal(verifier, token) == "malformed token"


async def test_tokens_over_8_kib_are_refused(verifier: TokenVerifier) -> None:
    key = signing_key("EC")
    claims = access_claims()

    def padded(n: int) -> str:
        return mint(key, claims | {"pad": "x" * n})

    n = max(i for i in range(MAX_TOKEN_LENGTH) if len(padded(i)) <= MAX_TOKEN_LENGTH)
    assert len(padded(n)) > MAX_TOKEN_LENGTH - 4
    assert (await verifier.verify(padded(n))).subject == "user-1"
    assert await refusal(verifier, padded(n + 1)) == "token too large"
    assert await refusal(verifier, "a" * 1_000_000) == "token too large"


@pytest.mark.parametrize(
    "payload",
    [
        '{"iss":"https://issuer.example","sub":"user-1","sub":"admin"}',  # duplicate member
        '{"a":' + "[" * 2000 + "]" * 2000 + "}",  # deeper than the JSON parser goes
        '{"exp": NaN}',
        '{"exp": ' + "9" * 5000 + "}",  # more digits than Python parses into an int
        "[]",
    ],
)
async def test_hostile_payload_json_is_refused(verifier: TokenVerifier, payload: str) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), payload)) == "malformed token"


# ---- issuer and claims --------------------------------------------------------------------
@pytest.mark.parametrize(
    "iss", [OTHER_ISSUER, ISSUER + "/", ISSUER.upper(), " " + ISSUER, "", None, DROP, [ISSUER], 7]
)
async def test_the_issuer_must_be_configured_exactly(verifier: TokenVerifier, iss: Any) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), access_claims(iss=iss))) == "unknown issuer"


async def test_the_iss_claim_only_chooses_whose_keys_verify() -> None:
    """A token claiming issuer A but signed with issuer B's key is refused."""
    key_a, key_b = signing_key("EC"), signing_key("EC", "ec-b")
    v = TokenVerifier(
        [
            IssuerConfig(ISSUER, AUDIENCE, StaticKeys(public_keyset(KeySet([key_a])))),
            IssuerConfig(OTHER_ISSUER, AUDIENCE, StaticKeys(public_keyset(KeySet([key_b])))),
        ]
    )
    assert (await v.verify(mint(key_b, access_claims(iss=OTHER_ISSUER)))).issuer == OTHER_ISSUER
    assert await refusal(v, mint(key_b, access_claims(iss=ISSUER))) == "unknown key"
    assert await refusal(v, mint(key_b, access_claims(iss=ISSUER), kid=DROP)) == "bad signature"


@pytest.mark.parametrize(
    ("aud", "ok"),
    [
        (AUDIENCE, True),
        ([AUDIENCE], True),
        (["other", AUDIENCE], True),
        ("other", False),
        ([], False),
        (DROP, False),
        (AUDIENCE.upper(), False),
        ("iotvault-api ", False),
    ],
)
async def test_the_audience_must_contain_the_configured_one(
    verifier: TokenVerifier, aud: Any, ok: bool
) -> None:
    token = mint(signing_key("EC"), access_claims(aud=aud))
    if ok:
        assert AUDIENCE in (await verifier.verify(token)).audience
    else:
        assert await refusal(verifier, token) == "wrong audience"


@pytest.mark.parametrize("aud", [{"aud": AUDIENCE}, [AUDIENCE, 1], 42])
async def test_a_malformed_audience_is_refused(verifier: TokenVerifier, aud: Any) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), access_claims(aud=aud))) == "malformed claims"


async def test_expiry_is_required_and_checked_with_leeway() -> None:
    key = signing_key("EC")
    v = verifier_for(key, leeway_s=30)
    now = int(time.time())
    assert await refusal(v, mint(key, access_claims(exp=DROP))) == "missing expiry"
    assert await refusal(v, mint(key, access_claims(exp=now - 60))) == "expired"
    assert (await v.verify(mint(key, access_claims(exp=now - 5)))).expires_at == now - 5  # within leeway
    assert await refusal(verifier_for(key, leeway_s=0), mint(key, access_claims(exp=now - 1))) == "expired"


@pytest.mark.parametrize("exp", ["9999999999", True, [9999999999], {"t": 1}])
async def test_a_malformed_expiry_is_refused(verifier: TokenVerifier, exp: Any) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), access_claims(exp=exp))) == "malformed claims"


async def test_an_infinite_expiry_is_refused(verifier: TokenVerifier) -> None:
    payload = json.dumps(access_claims(exp=0)).replace('"exp": 0', '"exp": 1e400')  # parses as inf
    assert await refusal(verifier, mint(signing_key("EC"), payload)) == "malformed claims"


async def test_not_before_must_not_be_in_the_future() -> None:
    key = signing_key("EC")
    v = verifier_for(key, leeway_s=30)
    now = int(time.time())
    assert await refusal(v, mint(key, access_claims(nbf=now + 120))) == "not yet valid"
    assert (await v.verify(mint(key, access_claims(nbf=now + 10)))).subject == "user-1"
    assert (await v.verify(mint(key, access_claims(nbf=now - 10)))).subject == "user-1"
    assert await refusal(v, mint(key, access_claims(nbf="soon"))) == "malformed claims"


async def test_issued_at_must_not_be_in_the_future() -> None:
    key = signing_key("EC")
    v = verifier_for(key, leeway_s=30)
    now = int(time.time())
    assert await refusal(v, mint(key, access_claims(iat=now + 3600))) == "issued in the future"
    assert (await v.verify(mint(key, access_claims(iat=now + 10)))).subject == "user-1"
    assert (await v.verify(mint(key, access_claims(iat=DROP)))).subject == "user-1"


@pytest.mark.parametrize(("sub", "reason"), [(DROP, "missing subject"), ("", "missing subject")])
async def test_the_subject_is_a_required_non_empty_string(
    verifier: TokenVerifier, sub: Any, reason: str
) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), access_claims(sub=sub))) == reason


@pytest.mark.parametrize("sub", [None, 42, ["user-1"], {"id": 1}, "u" * 256])
async def test_a_malformed_subject_is_refused(verifier: TokenVerifier, sub: Any) -> None:
    reason = await refusal(verifier, mint(signing_key("EC"), access_claims(sub=sub)))
    assert reason in {"missing subject", "malformed claims"}


@pytest.mark.parametrize(
    ("value", "groups"),
    [
        (["a", "b"], ("a", "b")),
        ("a b  c", ("a", "b", "c")),
        ([], ()),
        (DROP, ()),
        (None, ()),
    ],
)
async def test_groups_come_from_the_configured_claim(value: Any, groups: tuple[str, ...]) -> None:
    key = signing_key("EC")
    v = verifier_for(key, groups_claim="https://example.com/roles")
    token = mint(key, access_claims(**{"https://example.com/roles": value, "groups": ["ignored"]}))
    assert (await v.verify(token)).groups == groups


@pytest.mark.parametrize("value", [{"admin": True}, ["a", 1], 5, True])
async def test_malformed_groups_are_refused(verifier: TokenVerifier, value: Any) -> None:
    assert await refusal(verifier, mint(signing_key("EC"), access_claims(groups=value))) == "malformed claims"


@pytest.mark.parametrize(
    ("amr", "anonymous"), [(["anon"], True), (["pwd", "anon"], True), (["pwd"], False), (DROP, False)]
)
async def test_anonymous_is_anon_in_amr(verifier: TokenVerifier, amr: Any, anonymous: bool) -> None:
    assert (await verifier.verify(mint(signing_key("EC"), access_claims(amr=amr)))).anonymous is anonymous


async def test_a_malformed_amr_is_refused_rather_than_read_as_not_anonymous(verifier: TokenVerifier) -> None:
    assert (
        await refusal(verifier, mint(signing_key("EC"), access_claims(amr={"anon": 1}))) == "malformed claims"
    )


@pytest.mark.parametrize(
    ("members", "scopes"),
    [
        ({"scope": "a b"}, ("a", "b")),
        ({"scope": DROP, "scp": ["a", "b"]}, ("a", "b")),
        ({"scope": DROP, "scp": "a b"}, ("a", "b")),
        ({"scope": "a", "scp": ["b"]}, ("a",)),
        ({"scope": DROP}, ()),
    ],
)
async def test_scopes_from_scope_or_scp(
    verifier: TokenVerifier, members: dict[str, Any], scopes: tuple[str, ...]
) -> None:
    assert (await verifier.verify(mint(signing_key("EC"), access_claims(**members)))).scopes == scopes


@pytest.mark.parametrize(("value", "user_name"), [("bob", "bob"), (DROP, None), ("", None), (7, None)])
async def test_user_name_is_preferred_username(
    verifier: TokenVerifier, value: Any, user_name: str | None
) -> None:
    token = mint(signing_key("EC"), access_claims(preferred_username=value))
    assert (await verifier.verify(token)).user_name == user_name


# ---- the seed's "Bearer <access> <id>" ----------------------------------------------------
async def test_an_id_token_beside_the_access_token_is_verified(verifier: TokenVerifier) -> None:
    key = signing_key("EC")
    result = await verifier.verify(mint(key), mint_id(signing_key("RSA")))
    assert result.subject == "user-1"
    assert result.audience == (AUDIENCE,)  # the access token's; the ID token's aud is not checked


@pytest.mark.parametrize(
    ("id_token", "reason"),
    [
        (lambda: mint_id(signing_key("EC"), id_claims(sub="user-2")), "ID token subject differs"),
        (lambda: mint_id(signing_key("EC"), id_claims(sub=DROP)), "missing subject"),
        (lambda: mint_id(signing_key("EC"), id_claims(exp=int(time.time()) - 3600)), "expired"),
        (lambda: mint_id(signing_key("EC"), id_claims(exp=DROP)), "missing expiry"),
        (lambda: mint_id(signing_key("EC"), id_claims(nbf=int(time.time()) + 3600)), "not yet valid"),
        (lambda: mint_id(new_signing_key("EC", "ec-1")), "bad signature"),
        (lambda: mint_id(new_signing_key("EC", "stranger")), "unknown key"),
        (lambda: mint_id(signing_key("EC"), id_claims(iss=OTHER_ISSUER)), "ID token from another issuer"),
        (
            lambda: mint_id(OctKey.generate_key(256, parameters={"kid": "ec-1"}), alg="HS256"),
            "algorithm not allowed",
        ),
        (lambda: mint_id(signing_key("EC"), typ="at+jwt"), "wrong token type"),
        (lambda: mint_id(signing_key("EC"), kid=["ec-1"]), "malformed key id"),
        (lambda: "not-a-token", "malformed token"),
    ],
)
async def test_a_bad_id_token_refuses_the_pair(
    verifier: TokenVerifier, id_token: Callable[[], str], reason: str
) -> None:
    assert await refusal(verifier, mint(signing_key("EC")), id_token()) == reason


async def test_an_id_token_from_another_configured_issuer_is_refused() -> None:
    key_a, key_b = signing_key("EC"), signing_key("EC", "ec-b")
    v = TokenVerifier(
        [
            IssuerConfig(ISSUER, AUDIENCE, StaticKeys(public_keyset(KeySet([key_a])))),
            IssuerConfig(OTHER_ISSUER, AUDIENCE, StaticKeys(public_keyset(KeySet([key_b])))),
        ]
    )
    id_token = mint_id(key_b, id_claims(iss=OTHER_ISSUER))
    assert await refusal(v, mint(key_a), id_token) == "ID token from another issuer"


# ---- keys: public_keyset and StaticKeys ---------------------------------------------------
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def test_public_keyset_drops_every_private_member() -> None:
    private = KeySet([signing_key("EC"), signing_key("RSA"), signing_key("OKP")])
    public = public_keyset(private)
    assert [k.kid for k in public] == ["ec-1", "rsa-1", "okp-1"]
    for key in public:
        assert not key.is_private
        assert not PRIVATE_MEMBERS & set(key.as_dict())
    assert not PRIVATE_MEMBERS & {m for k in public.as_dict()["keys"] for m in k}
    assert all(k.is_private for k in private)  # the private set is left as it was


def test_public_keyset_refuses_symmetric_keys() -> None:
    with pytest.raises(ValidationError, match="oct"):
        public_keyset(KeySet([signing_key("EC"), OctKey.generate_key(256)]))


@pytest.mark.parametrize("key", [lambda: signing_key("EC"), lambda: OctKey.generate_key(256)])
def test_static_keys_take_public_keys_only(key: Callable[[], Key]) -> None:
    with pytest.raises(ValidationError, match="public keys only"):
        StaticKeys(KeySet([key()]))


# ---- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({"audience": ""}, "oidc_external_audience"),
        ({"issuer": ""}, "oidc_external_issuer"),
        ({"groups_claim": ""}, "oidc_external_groups_claim"),
        ({"leeway_s": -1}, "oidc_external_leeway_s"),
        ({"leeway_s": 3600}, "oidc_external_leeway_s"),
        ({"issuer": "", "local": True}, "public_url"),
    ],
)
def test_issuer_config_fails_at_start_naming_the_setting(config: dict[str, Any], setting: str) -> None:
    keys = StaticKeys(public_keyset(KeySet([signing_key("EC")])))
    with pytest.raises(ConfigError) as info:
        IssuerConfig(**({"issuer": ISSUER, "audience": AUDIENCE, "keys": keys} | config))
    assert info.value.setting == setting


def test_an_issuer_configured_twice_is_refused() -> None:
    keys = StaticKeys(public_keyset(KeySet([signing_key("EC")])))
    with pytest.raises(ConfigError, match="configured twice"):
        TokenVerifier([IssuerConfig(ISSUER, AUDIENCE, keys), IssuerConfig(ISSUER, "x", keys, local=True)])


async def test_no_issuer_configured_refuses_every_token() -> None:
    assert await refusal(TokenVerifier([]), mint(signing_key("EC"))) == "unknown issuer"


# ---- RemoteJwks against a fake issuer (the real HTTP server is in the integration tests) ----
class FakeIssuer:
    """An OpenID Connect issuer's discovery document and JWKS, served by httpx.MockTransport."""

    def __init__(self, issuer: str = ISSUER, *keys: Key) -> None:
        self.issuer = issuer
        self.discovery: dict[str, Any] = {"issuer": issuer, "jwks_uri": issuer + "/jwks"}
        self.jwks: Any = public_keyset(KeySet(list(keys) or [signing_key("EC")])).as_dict()
        self.jwks_status = 200
        self.down = False
        self.requests: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/.well-known/openid-configuration"):
            return httpx.Response(200, json=self.discovery)
        if request.url.path == "/jwks":
            if isinstance(self.jwks, bytes):
                return httpx.Response(self.jwks_status, content=self.jwks)
            return httpx.Response(self.jwks_status, json=self.jwks)
        return httpx.Response(404)

    def source(self, **options: Any) -> RemoteJwks:
        client = httpx.AsyncClient(transport=httpx.MockTransport(self.handler))
        return RemoteJwks(self.issuer, http=client, **options)

    @property
    def jwks_fetches(self) -> int:
        return self.requests.count("/jwks")


async def test_remote_keys_are_discovered_fetched_and_cached() -> None:
    fake = FakeIssuer()
    source = fake.source()
    keyset = await source.keys()
    assert [k.kid for k in keyset] == ["ec-1"]
    assert fake.requests == ["/.well-known/openid-configuration", "/jwks"]
    await source.keys()
    await source.keys()
    assert fake.jwks_fetches == 1
    v = TokenVerifier([IssuerConfig(ISSUER, AUDIENCE, source)])
    assert (await v.verify(mint(signing_key("EC")))).subject == "user-1"


async def test_discovery_of_an_issuer_with_a_path_and_trailing_slash() -> None:
    fake = FakeIssuer(ISSUER + "/realms/iot/")
    fake.discovery["jwks_uri"] = ISSUER + "/jwks"
    await fake.source().keys()
    assert fake.requests[0] == "/realms/iot/.well-known/openid-configuration"


@pytest.mark.parametrize(
    "named", [ISSUER + "/", "https://evil.example", ISSUER.replace("https", "http"), None, DROP]
)
async def test_a_discovery_document_naming_another_issuer_is_refused(named: Any) -> None:
    fake = FakeIssuer()
    fake.discovery = {"jwks_uri": ISSUER + "/jwks"} | ({} if named is DROP else {"issuer": named})
    with pytest.raises(InvalidTokenError) as info:
        await fake.source().keys()
    assert info.value.reason == "issuer keys unavailable"
    assert fake.jwks_fetches == 0


@pytest.mark.parametrize(
    "jwks_uri", ["http://issuer.example/jwks", "file:///etc/passwd", "/jwks", "", None, ["https://x/jwks"]]
)
async def test_a_jwks_uri_that_is_not_https_is_refused(jwks_uri: Any) -> None:
    fake = FakeIssuer()
    fake.discovery["jwks_uri"] = jwks_uri
    with pytest.raises(InvalidTokenError, match="issuer keys unavailable"):
        await fake.source().keys()
    assert fake.jwks_fetches == 0


@pytest.mark.parametrize(
    "issuer",
    [
        "http://issuer.example",
        "http://10.0.0.1",
        "ftp://issuer.example",
        "issuer.example",
        "",
        "https://",
        ISSUER + "?a=b",
        ISSUER + "#f",
    ],
)
def test_remote_issuers_must_be_https(issuer: str) -> None:
    with pytest.raises(ConfigError) as info:
        RemoteJwks(issuer)
    assert info.value.setting == "oidc_external_issuer"


@pytest.mark.parametrize(
    "issuer", ["http://127.0.0.1:8080", "http://localhost:9000/realm", "http://[::1]:80"]
)
def test_plain_http_is_allowed_on_the_loopback_interface_only(issuer: str) -> None:
    assert RemoteJwks(issuer).issuer == issuer


def _rsa_1024_jwk() -> dict[str, Any]:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    numbers = weak.public_key().public_numbers()
    return {"kty": "RSA", "kid": "weak", "n": b64(numbers.n.to_bytes(128, "big")), "e": "AQAB"}


async def test_published_keys_are_used_as_public_keys_and_unusable_ones_are_dropped() -> None:
    fake = FakeIssuer()
    ec = signing_key("EC")
    fake.jwks = {
        "keys": [
            ec.as_dict(private=True),  # an issuer that publishes its private key: use the public half
            OctKey.generate_key(256, parameters={"kid": "hmac"}).as_dict(private=True),
            ECKey.generate_key("P-384", parameters={"kid": "p384"}).as_dict(),
            public_keyset(KeySet([new_signing_key("EC", "for-encryption")])).keys[0].as_dict(use="enc"),
            _rsa_1024_jwk(),
            {"kty": "EC", "kid": "off-curve", "crv": "P-256", "x": b64(b"\x01" * 32), "y": b64(b"\x02" * 32)},
            {"kty": "PQC", "kid": "future"},
            {"kid": "no-kty"},
            "not a key",
            signing_key("OKP").as_dict(private=False),
        ]
    }
    keyset = await fake.source().keys()
    assert [k.kid for k in keyset] == ["ec-1", "okp-1"]
    assert not any(k.is_private for k in keyset)


@pytest.mark.parametrize(
    "jwks",
    [b"not json", b"[]", b'{"keys": {}}', b"{}", b"\xff\xfe", b'{"keys": [' + b"1," * 200_000 + b"1]}"],
)
async def test_a_broken_or_huge_jwks_makes_keys_unavailable(jwks: bytes) -> None:
    fake = FakeIssuer()
    fake.jwks = jwks
    with pytest.raises(InvalidTokenError, match="issuer keys unavailable"):
        await fake.source().keys()


@pytest.mark.parametrize("status", [301, 404, 500, 503])
async def test_an_error_status_makes_keys_unavailable(status: int) -> None:
    fake = FakeIssuer()
    fake.jwks_status = status
    with pytest.raises(InvalidTokenError, match="issuer keys unavailable"):
        await fake.source().keys()


async def test_an_unreachable_issuer_refuses_tokens_without_hammering_it() -> None:
    fake = FakeIssuer()
    fake.down = True
    v = TokenVerifier([IssuerConfig(ISSUER, AUDIENCE, fake.source(min_refresh_interval_s=60))])
    for _ in range(5):
        assert await refusal(v, mint(signing_key("EC"))) == "issuer keys unavailable"
    assert len(fake.requests) == 1


async def test_refreshes_are_rate_limited() -> None:
    fake = FakeIssuer()
    source = fake.source(min_refresh_interval_s=60)
    for _ in range(20):
        await source.keys(refresh=True)
    assert fake.jwks_fetches == 1

    eager = FakeIssuer()
    source = eager.source(min_refresh_interval_s=0)
    for _ in range(3):
        await source.keys(refresh=True)
    assert eager.jwks_fetches == 3


async def test_concurrent_refreshes_fetch_once() -> None:
    fake = FakeIssuer()
    source = fake.source(min_refresh_interval_s=60)
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(functools.partial(source.keys, refresh=True))
    assert fake.jwks_fetches == 1


async def test_keys_are_fetched_again_after_their_ttl() -> None:
    fake = FakeIssuer()
    source = fake.source(cache_ttl_s=0.05, min_refresh_interval_s=0)
    await source.keys()
    await source.keys()
    assert fake.jwks_fetches == 1
    await anyio.sleep(0.06)
    await source.keys()
    assert fake.jwks_fetches == 2


async def test_known_keys_stay_in_use_while_the_issuer_is_down(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeIssuer()
    source = fake.source(cache_ttl_s=0, min_refresh_interval_s=0)
    v = TokenVerifier([IssuerConfig(ISSUER, AUDIENCE, source)])
    await v.verify(mint(signing_key("EC")))
    fake.down = True
    assert (await v.verify(mint(signing_key("EC")))).subject == "user-1"
    assert fake.requests.count("/.well-known/openid-configuration") == 2
    assert "unavailable" in caplog.text


# ---- never another exception --------------------------------------------------------------
def _verify_or_refuse(verifier: TokenVerifier, token: str, id_token: str | None = None) -> None:
    async def run() -> None:
        with contextlib.suppress(InvalidTokenError):
            await verifier.verify(token, id_token)

    asyncio.run(run())


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_VERIFIER = verifier_for(signing_key("EC"), signing_key("RSA"), signing_key("OKP"))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jwk", "x5t", "cty", "zip"])
CLAIM_NAMES = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "groups", "amr", "scope", "scp"])


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_is_refused(text: str) -> None:
    _verify_or_refuse(FUZZ_VERIFIER, text)
    _verify_or_refuse(FUZZ_VERIFIER, mint(signing_key("EC")), text)


@FUZZ
@given(st.data())
def test_fuzz_mutated_tokens_are_refused_cleanly(data: st.DataObject) -> None:
    token = list(mint(signing_key(data.draw(st.sampled_from(["EC", "RSA", "OKP"])))))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(token) - 1))
        token[position] = data.draw(st.sampled_from("AaZz09-_.=+/ \x00é"))
    _verify_or_refuse(FUZZ_VERIFIER, "".join(token))


@FUZZ
@given(
    st.dictionaries(HEADER_NAMES | st.text(max_size=5), JSON_VALUES, max_size=5),
    st.dictionaries(CLAIM_NAMES | st.text(max_size=5), JSON_VALUES, max_size=8),
    st.booleans(),
)
def test_fuzz_signed_tokens_with_arbitrary_members_never_raise_anything_else(
    header: dict[str, Any], claims: dict[str, Any], keep_valid_alg: bool
) -> None:
    key = signing_key("EC")
    if keep_valid_alg:
        header = header | {"alg": "ES256"}
    fields = {"kid": key.kid} | header
    signing_input = f"{b64(json.dumps(fields).encode())}.{b64(json.dumps(claims).encode())}"
    signature = JWSRegistry.algorithms["ES256"].sign(signing_input.encode(), key)
    _verify_or_refuse(FUZZ_VERIFIER, f"{signing_input}.{b64(signature)}")
