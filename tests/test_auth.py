"""Tests for unrealon.auth: keys, connection tokens, room tokens, room patterns.

Real keys are generated here with cryptography; time is a task.Clock set far from the wall
clock, so a verifier that looked at real time would fail these tests.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from unrealon.auth import (
    ROOM_NAME_RE,
    SUPPORTED_ALGORITHMS,
    USER_ID_RE,
    AuthError,
    Identity,
    JWTSettings,
    KeyConfigError,
    RoomGrant,
    TokenVerifier,
    VerificationKey,
    load_keys,
    may_join,
    room_pattern_matches,
    validate_algorithms,
)

# 2017: tokens valid "now" here are long expired on the wall clock.
NOW = 1_500_000_000.0
SECRET = "s" * 64  # long enough for HS512 without pyjwt's short-key warning
OTHER_SECRET = "o" * 64

REASONS = {
    "invalid token",
    "invalid signature",
    "algorithm not allowed",
    "unknown key id",
    "token expired",
    "token not yet valid",
    "token issued in the future",
    "token has no expiry",
    "invalid audience",
    "invalid issuer",
    "invalid user id",
    "invalid info claim",
    "info claim too large",
    "invalid rooms claim",
    "room token required",
    "room token not accepted here",
    "room token is for another user",
    "room token is for another room",
}


@functools.cache
def rsa_key(n: int) -> rsa.RSAPrivateKey:
    """RSA-2048 private key number n (cached: generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_token(header: Mapping[str, Any], payload: Mapping[str, Any], sig: bytes) -> str:
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(sig),
        ]
    )


def hand_hs256(payload: Mapping[str, Any], secret: bytes, kid: str | None = None) -> str:
    """An HS256 token signed by hand (pyjwt refuses a PEM as an HMAC secret)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = raw_token(header, payload, b"").rsplit(".", 1)[0]
    sig = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def claims(**extra: Any) -> dict[str, Any]:
    """Valid connection-token claims at NOW, overridable; None removes a claim."""
    base: dict[str, Any] = {"sub": "alice", "exp": NOW + 600, "iat": NOW}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: Mapping[str, Any],
    key: Any = SECRET,
    alg: str = "HS256",
    kid: str | None = None,
) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(dict(payload), key, algorithm=alg, headers=headers)


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, name: str, data: bytes | str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path

    def verifier(
        self,
        keys: tuple[VerificationKey, ...] | None = None,
        algorithms: tuple[str, ...] = ("HS256",),
        **kw: Any,
    ) -> TokenVerifier:
        if keys is None:
            keys = load_keys(SECRET, [])
        return TokenVerifier(JWTSettings(keys=keys, algorithms=algorithms, **kw), self.clock)

    def refused(self, verifier: TokenVerifier, token: str, reason: str) -> AuthError:
        """Assert the token is refused as a connection token with exactly this reason."""
        err: AuthError = self.assertRaises(AuthError, verifier.verify_connection_token, token)
        self.assertEqual(err.reason, reason)
        self.assertEqual(str(err), reason)
        return err


class ConnectionTokenTests(Base):
    def test_hmac_algorithms(self) -> None:
        v = self.verifier(algorithms=("HS256", "HS384", "HS512"))
        for alg in ("HS256", "HS384", "HS512"):
            ident = v.verify_connection_token(sign(claims(), alg=alg))
            self.assertEqual(ident, Identity("alice", NOW + 600, {}, ()))

    def test_identity_fields(self) -> None:
        token = sign(claims(info={"name": "Alice", "n": 1}, rooms=["ws:1:*", "broadcast"]))
        ident = self.verifier().verify_connection_token(token)
        self.assertEqual(ident.user_id, "alice")
        self.assertEqual(ident.expires_at, NOW + 600)
        self.assertIsInstance(ident.expires_at, float)
        self.assertEqual(ident.info, {"name": "Alice", "n": 1})
        self.assertEqual(ident.room_patterns, ("ws:1:*", "broadcast"))

    def test_wrong_secret(self) -> None:
        self.refused(self.verifier(), sign(claims(), key=OTHER_SECRET), "invalid signature")

    def test_tampered_payload(self) -> None:
        header, _, sig = sign(claims()).split(".")
        forged = b64url(json.dumps(claims(sub="mallory")).encode())
        self.refused(self.verifier(), f"{header}.{forged}.{sig}", "invalid signature")

    def test_algorithm_not_in_allow_list(self) -> None:
        self.refused(self.verifier(), sign(claims(), alg="HS384"), "algorithm not allowed")

    def test_none_algorithm_refused(self) -> None:
        v = self.verifier(algorithms=SUPPORTED_ALGORITHMS)
        for alg in ("none", "None", "NONE"):
            token = raw_token({"alg": alg, "typ": "JWT"}, claims(), b"")
            self.assertTrue(token.endswith("."))
            self.refused(v, token, "algorithm not allowed")
        # Also with a signature part and without any alg at all.
        self.refused(v, raw_token({"alg": "none"}, claims(), b"x"), "algorithm not allowed")
        self.refused(v, raw_token({"typ": "JWT"}, claims(), b"x"), "algorithm not allowed")

    def test_uses_injected_clock_for_expiry(self) -> None:
        # exp + 600 s after NOW is 2017: long past on the wall clock, still valid here.
        v = self.verifier()
        v.verify_connection_token(sign(claims()))
        # And a token valid on the wall clock is expired once the clock passes its exp.
        far = 4_000_000_000
        token = sign(claims(exp=far, iat=None))
        v.verify_connection_token(token)
        self.clock.advance(far - NOW + 10)
        self.refused(v, token, "token expired")

    def test_verified_token_remembered_but_times_checked_again(self) -> None:
        """A token shown again is not verified again; its expiry still is, every time."""
        v = self.verifier()
        token = sign(claims(exp=NOW + 100))
        first = v.verify_connection_token(token)
        calls = []
        original = v._decode_with

        def counting(*args: Any) -> Any:
            calls.append(args)
            return original(*args)

        v._decode_with = counting  # type: ignore[method-assign]
        self.assertEqual(v.verify_connection_token(token), first)
        self.assertEqual(calls, [])  # the signature was not checked again
        # a different token (one character of the signature) is verified afresh
        self.refused(v, token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1],
                     "invalid signature")
        self.clock.advance(200)
        self.refused(v, token, "token expired")

    def test_expiry_with_leeway(self) -> None:
        v = self.verifier(leeway=5.0)
        exp = NOW + 100
        token = sign(claims(exp=exp))
        self.clock.advance(exp - 1 - NOW)
        self.assertEqual(v.verify_connection_token(token).expires_at, exp)
        self.clock.advance(5)  # exp + leeway - 1
        v.verify_connection_token(token)
        self.clock.advance(2)  # exp + leeway + 1
        self.refused(v, token, "token expired")

    def test_zero_leeway(self) -> None:
        v = self.verifier(leeway=0)
        token = sign(claims(exp=NOW + 10))
        self.clock.advance(10)
        v.verify_connection_token(token)
        self.clock.advance(1)
        self.refused(v, token, "token expired")

    def test_exp_required(self) -> None:
        self.refused(self.verifier(), sign(claims(exp=None)), "token has no expiry")

    def test_exp_must_be_a_number(self) -> None:
        v = self.verifier()
        for bad in ("9999999999", True, None, [1], 10**400):
            payload = claims()
            payload["exp"] = bad
            token = hand_hs256(payload, SECRET.encode())
            err = self.assertRaises(AuthError, v.verify_connection_token, token)
            self.assertIn(err.reason, {"invalid token", "token has no expiry"})
        # A float exp is a valid NumericDate.
        v.verify_connection_token(sign(claims(exp=NOW + 0.5)))

    def test_non_finite_exp(self) -> None:
        # json.loads accepts Infinity; a token must not live forever through it.
        signing_input = (
            b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(b'{"sub":"a","exp":Infinity}')
        )
        sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        self.refused(self.verifier(), f"{signing_input}.{b64url(sig)}", "invalid token")

    def test_nbf(self) -> None:
        v = self.verifier(leeway=5.0)
        self.refused(v, sign(claims(nbf=NOW + 60)), "token not yet valid")
        self.refused(v, sign(claims(nbf=NOW + 6)), "token not yet valid")
        v.verify_connection_token(sign(claims(nbf=NOW + 4)))  # within the leeway
        v.verify_connection_token(sign(claims(nbf=NOW - 60)))
        token = sign(claims(nbf=NOW + 60))
        self.clock.advance(56)
        v.verify_connection_token(token)
        self.refused(v, sign(claims(nbf="soon")), "invalid token")

    def test_iat(self) -> None:
        v = self.verifier(leeway=5.0)
        self.refused(v, sign(claims(iat=NOW + 60)), "token issued in the future")
        v.verify_connection_token(sign(claims(iat=NOW + 4)))
        v.verify_connection_token(sign(claims(iat=None)))
        self.refused(v, sign(claims(iat="yesterday")), "invalid token")

    def test_audience(self) -> None:
        v = self.verifier(audience="unrealon")
        v.verify_connection_token(sign(claims(aud="unrealon")))
        v.verify_connection_token(sign(claims(aud=["other", "unrealon"])))
        self.refused(v, sign(claims(aud="other")), "invalid audience")
        self.refused(v, sign(claims(aud=["a", "b"])), "invalid audience")
        self.refused(v, sign(claims()), "invalid audience")
        self.refused(v, sign(claims(aud=5)), "invalid audience")

    def test_audience_not_configured_accepts_any_aud(self) -> None:
        v = self.verifier()
        v.verify_connection_token(sign(claims(aud="whatever")))
        v.verify_connection_token(sign(claims(aud=["x", "y"])))

    def test_issuer(self) -> None:
        v = self.verifier(issuer="https://idp.example")
        v.verify_connection_token(sign(claims(iss="https://idp.example")))
        self.refused(v, sign(claims(iss="https://evil.example")), "invalid issuer")
        self.refused(v, sign(claims()), "invalid issuer")
        listed = hand_hs256(claims(iss=["https://idp.example"]), SECRET.encode())
        self.refused(v, listed, "invalid issuer")
        # Not configured: any iss passes.
        self.verifier().verify_connection_token(sign(claims(iss="anyone")))

    def test_numeric_sub(self) -> None:
        v = self.verifier()
        self.assertEqual(v.verify_connection_token(sign(claims(sub=42))).user_id, "42")
        # jwt.encode refuses a non-string sub, so sign by hand.
        ident = v.verify_connection_token(hand_hs256(claims(sub=1234567890123), SECRET.encode()))
        self.assertEqual(ident.user_id, "1234567890123")

    def test_user_id_fallback(self) -> None:
        v = self.verifier()
        ident = v.verify_connection_token(sign(claims(sub=None, user_id="bob")))
        self.assertEqual(ident.user_id, "bob")
        ident = v.verify_connection_token(sign(claims(sub=None, user_id=7)))
        self.assertEqual(ident.user_id, "7")
        # sub wins over user_id.
        ident = v.verify_connection_token(sign(claims(sub="carol", user_id="bob")))
        self.assertEqual(ident.user_id, "carol")

    def test_missing_user(self) -> None:
        self.refused(self.verifier(), sign(claims(sub=None)), "invalid user id")

    def test_bad_user_ids(self) -> None:
        v = self.verifier()
        bad_ids: list[Any] = ["", "a b", "a/b", "ü", "a:b", "x" * 129, "alice\n"]
        for bad in [*bad_ids, True, 1.5, [], {}]:
            token = hand_hs256(claims(sub=bad), SECRET.encode())
            self.refused(v, token, "invalid user id")
        for good in ("x" * 128, "a.b-c_d@e", "0"):
            self.assertEqual(v.verify_connection_token(sign(claims(sub=good))).user_id, good)

    def test_info(self) -> None:
        v = self.verifier()
        info = {"name": "Al", "avatar": None, "tags": ["a"]}
        self.assertEqual(v.verify_connection_token(sign(claims(info=info))).info, info)
        for bad in ("text", ["a"], 1, None):
            token = hand_hs256({**claims(), "info": bad}, SECRET.encode())
            self.refused(v, token, "invalid info claim")

    def test_info_size_limit(self) -> None:
        v = self.verifier()
        overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
        exact = {"k": "x" * (1024 - overhead)}
        v.verify_connection_token(sign(claims(info=exact)))
        self.refused(v, sign(claims(info={"k": "x" * (1025 - overhead)})), "info claim too large")
        # Bytes, not characters: 2-byte UTF-8 characters count twice.
        self.refused(v, sign(claims(info={"k": "é" * 600})), "info claim too large")

    def test_rooms(self) -> None:
        v = self.verifier()
        self.assertEqual(v.verify_connection_token(sign(claims(rooms=[]))).room_patterns, ())
        for bad in ("ws:*", {"ws:*": True}, ["ws:*", 3], [None], 1):
            self.refused(v, hand_hs256(claims(rooms=bad), SECRET.encode()), "invalid rooms claim")

    def test_malformed_tokens(self) -> None:
        v = self.verifier()
        good = sign(claims())
        bad_tokens: list[Any] = [
            "",
            "abc",
            "a.b",
            "a.b.c",
            "...",
            good + "x",
            good.replace(".", "!", 1),
            "é." + good,
            " " + good,
            "a" * 20000,
            good[: len(good) // 2],
            raw_token({"alg": "HS256"}, claims(), b"")[:-1] + "*",
            b64url(b"[1,2]") + "." + good.split(".", 1)[1],
            None,
            b"bytes.are.not",
            123,
        ]
        for token in bad_tokens:
            err = self.assertRaises(AuthError, v.verify_connection_token, token)
            self.assertIn(err.reason, {"invalid token", "invalid signature"}, repr(token))

    def test_payload_not_an_object(self) -> None:
        header = b64url(b'{"alg":"HS256"}')
        body = b64url(b"[1, 2]")
        sig = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
        self.refused(self.verifier(), f"{header}.{body}.{b64url(sig)}", "invalid token")


class KeySelectionTests(Base):
    def rsa_file(self, n: int = 0, name: str = "rsa.pem") -> str:
        return self.write(name, public_pem(rsa_key(n)))

    def test_rs256_pem(self) -> None:
        keys = load_keys(None, [self.rsa_file()])
        v = self.verifier(keys, algorithms=("RS256", "RS384", "RS512", "PS256"))
        for alg in ("RS256", "RS384", "RS512", "PS256"):
            ident = v.verify_connection_token(sign(claims(), key=rsa_key(0), alg=alg))
            self.assertEqual(ident.user_id, "alice")
        # The kid of a PEM key is its file name: a token naming it still verifies.
        v.verify_connection_token(sign(claims(), key=rsa_key(0), alg="RS256", kid="rsa"))

    def test_es256_pem(self) -> None:
        keys = load_keys(None, [self.write("ec.pem", public_pem(ec_key(0)))])
        v = self.verifier(keys, algorithms=("ES256",))
        v.verify_connection_token(sign(claims(), key=ec_key(0), alg="ES256"))
        self.refused(v, sign(claims(), key=ec_key(1), alg="ES256"), "invalid signature")

    def test_es384_with_p256_key_is_refused(self) -> None:
        # A key of the right family but the wrong curve is just "not this key".
        keys = load_keys(None, [self.write("ec.pem", public_pem(ec_key(0)))])
        v = self.verifier(keys, algorithms=("ES256", "ES384"))
        p384 = ec.generate_private_key(ec.SECP384R1())
        self.refused(v, sign(claims(), key=p384, alg="ES384"), "invalid signature")

    def test_rsa_signed_by_other_key(self) -> None:
        v = self.verifier(load_keys(None, [self.rsa_file()]), algorithms=("RS256",))
        self.refused(v, sign(claims(), key=rsa_key(1), alg="RS256"), "invalid signature")

    def test_no_key_of_the_algorithm_family(self) -> None:
        # RS256 allowed but only an HMAC secret configured, and the reverse.
        v = self.verifier(algorithms=("HS256", "RS256"))
        self.refused(v, sign(claims(), key=rsa_key(0), alg="RS256"), "algorithm not allowed")
        v = self.verifier(load_keys(None, [self.rsa_file()]), algorithms=("HS256", "RS256"))
        self.refused(v, sign(claims()), "algorithm not allowed")

    def test_algorithm_confusion_refused(self) -> None:
        """An HS256 token whose HMAC secret is the RSA public key PEM is never accepted."""
        pem = public_pem(rsa_key(0))
        path = self.rsa_file()
        forged = hand_hs256(claims(sub="mallory"), pem)
        forged_kid = hand_hs256(claims(sub="mallory"), pem, kid="rsa")
        everything = SUPPORTED_ALGORITHMS
        # Only the RSA key configured: no HMAC key to try at all.
        v = self.verifier(load_keys(None, [path]), algorithms=everything)
        self.refused(v, forged, "algorithm not allowed")
        self.refused(v, forged_kid, "algorithm not allowed")
        # RSA key and an HMAC secret: the forgery is checked against the secret only.
        v = self.verifier(load_keys(SECRET, [path]), algorithms=everything)
        self.refused(v, forged, "invalid signature")
        self.refused(v, forged_kid, "algorithm not allowed")
        # Only RS256 allowed: refused before any key is looked at.
        v = self.verifier(load_keys(SECRET, [path]), algorithms=("RS256",))
        self.refused(v, forged, "algorithm not allowed")
        # The PEM with whitespace variants, as an attacker might try.
        for variant in (pem.strip(), pem.replace(b"\n", b"\r\n")):
            v = self.verifier(load_keys(SECRET, [path]), algorithms=everything)
            self.refused(v, hand_hs256(claims(), variant), "invalid signature")

    def test_algorithm_confusion_ec(self) -> None:
        path = self.write("ec.pem", public_pem(ec_key(0)))
        forged = hand_hs256(claims(), public_pem(ec_key(0)))
        v = self.verifier(load_keys(None, [path]), algorithms=("HS256", "ES256"))
        self.refused(v, forged, "algorithm not allowed")

    def jwks(self) -> str:
        entries = []
        for n, kid in ((0, "k1"), (1, "k2")):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key(n).public_key()))
            jwk.update(kid=kid, use="sig", alg="RS256")
            entries.append(jwk)
        return self.write("jwks.json", json.dumps({"keys": entries}))

    def test_jwks_rotation(self) -> None:
        keys = load_keys(None, [self.jwks()])
        self.assertEqual([(k.kid, k.family) for k in keys], [("k1", "RSA"), ("k2", "RSA")])
        v = self.verifier(keys, algorithms=("RS256",))
        # Signed with the second key, naming it.
        v.verify_connection_token(sign(claims(), key=rsa_key(1), alg="RS256", kid="k2"))
        v.verify_connection_token(sign(claims(), key=rsa_key(0), alg="RS256", kid="k1"))
        # The kid selects the key: k2's signature under k1's id fails.
        self.refused(
            v,
            sign(claims(), key=rsa_key(1), alg="RS256", kid="k1"),
            "invalid signature",
        )
        # A key not in the set, under a new kid or under a known one.
        self.refused(v, sign(claims(), key=rsa_key(2), alg="RS256", kid="k3"), "unknown key id")
        self.refused(
            v,
            sign(claims(), key=rsa_key(2), alg="RS256", kid="k2"),
            "invalid signature",
        )
        self.refused(v, sign(claims(), key=rsa_key(2), alg="RS256"), "invalid signature")
        # Without a kid every RSA key is tried.
        v.verify_connection_token(sign(claims(), key=rsa_key(1), alg="RS256"))

    def test_kid_on_token_when_only_secret_configured(self) -> None:
        # A kid must name a configured key; the JWT_SECRET key has none.
        self.refused(self.verifier(), sign(claims(), kid="main"), "unknown key id")

    def test_jwks_oct_and_ec_keys(self) -> None:
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key(0).public_key()))
        ec_jwk["kid"] = "e1"
        oct_jwk = {"kty": "oct", "kid": "h1", "k": b64url(OTHER_SECRET.encode())}
        enc_jwk = {"kty": "oct", "kid": "enc", "use": "enc", "k": b64url(b"x" * 32)}
        path = self.write("jwks.json", json.dumps({"keys": [ec_jwk, oct_jwk, enc_jwk]}))
        keys = load_keys(None, [path])
        self.assertEqual([(k.kid, k.family) for k in keys], [("e1", "EC"), ("h1", "HMAC")])
        v = self.verifier(keys, algorithms=("HS256", "ES256"))
        v.verify_connection_token(sign(claims(), key=OTHER_SECRET, kid="h1"))
        v.verify_connection_token(sign(claims(), key=ec_key(0), alg="ES256", kid="e1"))
        # An HS256 token naming the EC key's kid never reaches the EC key.
        self.refused(v, sign(claims(), key=OTHER_SECRET, kid="e1"), "algorithm not allowed")
        self.refused(v, sign(claims(), key=OTHER_SECRET, kid="enc"), "unknown key id")


class RoomTokenTests(Base):
    def room_claims(self, **extra: Any) -> dict[str, Any]:
        return claims(**{"room": "ws:1:doc", **extra})

    def test_valid(self) -> None:
        grant = self.verifier().verify_room_token(sign(self.room_claims()), "alice", "ws:1:doc")
        self.assertEqual(grant, RoomGrant(room="ws:1:doc", user_id="alice", expires_at=NOW + 600))

    def test_numeric_sub_and_user_id_fallback(self) -> None:
        v = self.verifier()
        v.verify_room_token(sign(self.room_claims(sub=42)), "42", "ws:1:doc")
        v.verify_room_token(sign(self.room_claims(sub=None, user_id=42)), "42", "ws:1:doc")

    def refused_room(self, v: TokenVerifier, token: str, user: str, room: str, reason: str) -> None:
        err = self.assertRaises(AuthError, v.verify_room_token, token, user, room)
        self.assertEqual(err.reason, reason)

    def test_wrong_user(self) -> None:
        v = self.verifier()
        token = sign(self.room_claims())
        self.refused_room(v, token, "bob", "ws:1:doc", "room token is for another user")
        self.refused_room(v, token, "Alice", "ws:1:doc", "room token is for another user")
        self.refused_room(
            v, sign(self.room_claims(sub=None)), "alice", "ws:1:doc", "invalid user id"
        )

    def test_wrong_room(self) -> None:
        v = self.verifier()
        token = sign(self.room_claims())
        for room in ("ws:1:doc2", "ws:1:DOC", "ws:1:*", "ws:1"):
            self.refused_room(v, token, "alice", room, "room token is for another room")
        # A pattern in the room claim is not a pattern: it is only ever equal to itself.
        star = sign(self.room_claims(room="ws:*"))
        self.refused_room(v, star, "alice", "ws:1", "room token is for another room")
        for bad in (None, 5, ["ws:1:doc"]):
            token = hand_hs256({**self.room_claims(), "room": bad}, SECRET.encode())
            self.refused_room(v, token, "alice", "ws:1:doc", "invalid token")

    def test_expired(self) -> None:
        v = self.verifier(leeway=5.0)
        token = sign(self.room_claims(exp=NOW + 10))
        self.clock.advance(14)
        v.verify_room_token(token, "alice", "ws:1:doc")
        self.clock.advance(2)
        self.refused_room(v, token, "alice", "ws:1:doc", "token expired")
        no_exp = sign(self.room_claims(exp=None))
        self.refused_room(v, no_exp, "alice", "ws:1:doc", "token has no expiry")

    def test_signature_aud_iss_apply(self) -> None:
        v = self.verifier(audience="unrealon", issuer="idp")
        ok = self.room_claims(aud="unrealon", iss="idp")
        v.verify_room_token(sign(ok), "alice", "ws:1:doc")
        for payload, reason in (
            ({**ok, "aud": "other"}, "invalid audience"),
            ({**ok, "iss": "other"}, "invalid issuer"),
            ({**ok, "nbf": NOW + 60}, "token not yet valid"),
        ):
            self.refused_room(v, sign(payload), "alice", "ws:1:doc", reason)
        forged = sign(ok, key=OTHER_SECRET)
        self.refused_room(v, forged, "alice", "ws:1:doc", "invalid signature")

    def test_room_token_is_not_a_connection_token(self) -> None:
        v = self.verifier()
        self.refused(v, sign(self.room_claims()), "room token not accepted here")
        # Even with a null room claim: the claim's presence makes it a room token.
        null_room = {**self.room_claims(), "room": None}
        self.refused(v, sign(null_room), "room token not accepted here")

    def test_connection_token_is_not_a_room_token(self) -> None:
        v = self.verifier()
        token = sign(claims(rooms=["*"]))
        self.refused_room(v, token, "alice", "ws:1:doc", "room token required")


class ReasonsNeverLeakTests(Base):
    def test_bad_tokens_never_echoed(self) -> None:
        """No refusal carries the token, any part of it, or pyjwt's text."""
        v = self.verifier(audience="aud", issuer="iss")
        marker = "SECRETMARKER"
        header = {"alg": "HS256", "kid": marker}
        cases = [
            sign(claims(sub=marker)),  # no aud
            sign(claims(sub=marker, aud="aud", iss=marker)),
            sign(claims(sub=marker, aud=marker, iss="iss")),
            sign(claims(sub=marker + " x", aud="aud", iss="iss")),
            sign(claims(sub=marker, aud="aud", iss="iss"), key=OTHER_SECRET),
            sign(claims(sub=marker, aud="aud", iss="iss", exp=NOW - 100)),
            sign(claims(sub=marker, aud="aud", iss="iss", info={marker: "x" * 2000})),
            sign(claims(sub=marker, aud="aud", iss="iss", rooms=marker)),
            sign(claims(sub=marker, aud="aud", iss="iss", room=marker)),
            sign(claims(sub=marker), alg="HS512"),
            raw_token(header, claims(sub=marker), b""),
            raw_token({"alg": marker}, claims(), b""),
            raw_token({"alg": "none"}, claims(sub=marker), b""),
            b64url(marker.encode()) + "." + b64url(marker.encode()) + ".",
            marker + "." + marker + "." + marker,
            marker,
            hand_hs256(claims(sub=marker), b"-----BEGIN PUBLIC KEY-----" + marker.encode()),
        ]
        seen = set()
        for token in cases:
            for call in (
                lambda t: v.verify_connection_token(t),
                lambda t: v.verify_room_token(t, "alice", marker),
            ):
                err = self.assertRaises(AuthError, call, token)
                for text in (str(err), repr(err), err.reason):
                    self.assertNotIn(token, text)
                    self.assertNotIn(marker, text)
                    self.assertNotIn(marker.lower(), text.lower())
                self.assertIn(err.reason, REASONS)
                # pyjwt's exception is not chained in: tracebacks would print its text.
                self.assertIsNone(err.__cause__)
                self.assertTrue(err.__context__ is None or err.__suppress_context__)
                seen.add(err.reason)
        self.assertGreaterEqual(len(seen), 8)


class LoadKeysTests(Base):
    def test_secret(self) -> None:
        (key,) = load_keys(SECRET, [])
        self.assertEqual((key.kid, key.family, key.key), (None, "HMAC", SECRET.encode()))

    def test_nothing_configured(self) -> None:
        self.assertEqual(load_keys(None, []), ())

    def test_repr_hides_key_material(self) -> None:
        keys = load_keys(SECRET, [self.write("main.pem", public_pem(rsa_key(0)))])
        text = repr(keys) + repr(JWTSettings(keys=keys))
        self.assertNotIn(SECRET, text)
        self.assertNotIn("RSAPublicKey", text)
        self.assertIn("kid='main'", text)

    def test_pem_files(self) -> None:
        rsa_path = self.write("primary.pem", public_pem(rsa_key(0)))
        ec_path = self.write("edge-2024.pub", public_pem(ec_key(0)))
        keys = load_keys(SECRET, [rsa_path, ec_path])
        self.assertEqual(
            [(k.kid, k.family) for k in keys],
            [(None, "HMAC"), ("primary", "RSA"), ("edge-2024", "EC")],
        )
        self.assertIsInstance(keys[1].key, rsa.RSAPublicKey)
        self.assertIsInstance(keys[2].key, ec.EllipticCurvePublicKey)

    def assertConfigError(self, path: str, why: str, secret_bytes: bytes = b"") -> None:
        err = self.assertRaises(KeyConfigError, load_keys, None, [path])
        self.assertTrue(str(err).startswith(f"JWT_PUBLIC_KEY_FILE: cannot read {path}: "))
        self.assertIn(why, str(err))
        if secret_bytes:
            self.assertNotIn(secret_bytes.decode(), str(err))
        self.assertIsInstance(err, ValueError)

    def test_missing_file(self) -> None:
        path = os.path.join(self.dir, "nope.pem")
        self.assertConfigError(path, "No such file or directory")

    def test_directory(self) -> None:
        err = self.assertRaises(KeyConfigError, load_keys, None, [self.dir])
        self.assertIn(self.dir, str(err))

    def test_garbage_file(self) -> None:
        self.assertConfigError(self.write("k.pem", "hello"), "not a PEM public key")
        self.assertConfigError(self.write("e.pem", b""), "not a PEM public key")
        broken = public_pem(rsa_key(0))[:200]
        self.assertConfigError(self.write("b.pem", broken), "not a PEM", broken[30:60])

    def test_private_key_file(self) -> None:
        pem = rsa_key(0).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.assertConfigError(self.write("p.pem", pem), "private key", pem[40:80])

    def test_unsupported_key_type(self) -> None:
        pem = (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )
        self.assertConfigError(self.write("ed.pem", pem), "neither an RSA nor an EC key")

    def test_short_rsa_key(self) -> None:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.assertConfigError(self.write("small.pem", public_pem(small)), "1024-bit")

    def test_bad_jwks(self) -> None:
        secret = b64url(b"TOPSECRETKEYBYTES" * 3)
        for body, why in (
            ("{not json", "not valid JSON"),
            ('{"nokeys": []}', 'no "keys" list'),
            ('{"keys": {}}', 'no "keys" list'),
            ('{"keys": []}', "no signing key"),
            ('{"keys": [1]}', "key #0 is not a JSON object"),
            ('{"keys": [{"kid": 5, "kty": "oct"}]}', "non-string kid"),
            # PyJWK's own errors embed the whole JWK, secret included: never shown.
            (json.dumps({"keys": [{"kid": "x", "kty": "weird", "k": secret}]}), "'x'"),
            (json.dumps({"keys": [{"kty": "RSA", "n": secret}]}), "key #0"),
            (
                json.dumps({"keys": [{"kty": "oct", "alg": "RS256", "k": secret}]}),
                "key #0",
            ),
            (
                json.dumps({"keys": [{"kty": "oct", "alg": "none", "k": secret}]}),
                "key #0",
            ),
        ):
            path = self.write("jwks.json", body)
            self.assertConfigError(path, why, secret.encode())

    def test_jwks_private_entry_gives_public_key(self) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key(0)))
        jwk["kid"] = "full"
        (key,) = load_keys(None, [self.write("jwks.json", json.dumps({"keys": [jwk]}))])
        self.assertIsInstance(key.key, rsa.RSAPublicKey)

    def test_certificate_pem(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
        when = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(rsa_key(0).public_key())
            .serial_number(1)
            .not_valid_before(when)
            .not_valid_after(when + datetime.timedelta(days=3650))
            .sign(rsa_key(0), hashes.SHA256())
        )
        path = self.write("idp.crt", cert.public_bytes(serialization.Encoding.PEM))
        (key,) = load_keys(None, [path])
        self.assertEqual((key.kid, key.family), ("idp", "RSA"))
        v = self.verifier((key,), algorithms=("RS256",))
        v.verify_connection_token(sign(claims(), key=rsa_key(0), alg="RS256"))

    def test_bad_secret(self) -> None:
        err = self.assertRaises(KeyConfigError, load_keys, "", [])
        self.assertIn("JWT_SECRET", str(err))
        pem = public_pem(rsa_key(0)).decode()
        err = self.assertRaises(KeyConfigError, load_keys, pem, [])
        self.assertIn("JWT_SECRET", str(err))
        self.assertNotIn(pem[30:80], str(err))


class SettingsTests(SynchronousTestCase):
    def test_validate_algorithms(self) -> None:
        self.assertEqual(validate_algorithms(["HS256"]), ("HS256",))
        self.assertEqual(validate_algorithms(("RS256", "ES256", "RS256")), ("RS256", "ES256"))
        self.assertEqual(validate_algorithms(SUPPORTED_ALGORITHMS), SUPPORTED_ALGORITHMS)
        self.assertEqual(len(SUPPORTED_ALGORITHMS), 10)

    def test_none_refused(self) -> None:
        for bad in ("none", "None", "NONE"):
            err = self.assertRaises(KeyConfigError, validate_algorithms, ["HS256", bad])
            self.assertIn(repr(bad), str(err))
            self.assertTrue(str(err).startswith("JWT_ALGORITHMS: "))

    def test_unknown_refused(self) -> None:
        for bad in ("hs256", "HS1", "EdDSA", "ES256K", "PS384", "", " HS256"):
            err = self.assertRaises(KeyConfigError, validate_algorithms, [bad])
            self.assertIn(repr(bad), str(err))

    def test_empty_and_string(self) -> None:
        self.assertRaises(KeyConfigError, validate_algorithms, [])
        self.assertRaises(KeyConfigError, validate_algorithms, "HS256")

    def test_settings_validate(self) -> None:
        self.assertRaises(KeyConfigError, JWTSettings, keys=(), algorithms=("none",))
        self.assertRaises(KeyConfigError, JWTSettings, keys=(), leeway=-1)
        self.assertRaises(KeyConfigError, JWTSettings, keys=(), leeway=float("nan"))
        settings = JWTSettings(keys=())
        self.assertEqual((settings.algorithms, settings.leeway), (("HS256",), 5.0))
        self.assertRaises(KeyConfigError, attrs.evolve, settings, algorithms=("none",))

    def test_verification_key_family(self) -> None:
        self.assertRaises(ValueError, VerificationKey, None, "DSA", b"x")


class RoomPatternTests(SynchronousTestCase):
    def test_literal(self) -> None:
        self.assertTrue(room_pattern_matches("ws:1:doc", "ws:1:doc"))
        self.assertFalse(room_pattern_matches("ws:1:doc", "ws:1:Doc"))
        self.assertFalse(room_pattern_matches("ws:1", "ws:1:doc"))
        self.assertFalse(room_pattern_matches("ws:1:doc", "ws:1"))
        # Regex metacharacters are literal.
        self.assertFalse(room_pattern_matches("ws.1", "wsx1"))
        self.assertTrue(room_pattern_matches("ws.1", "ws.1"))
        self.assertFalse(room_pattern_matches("a+", "aa"))

    def test_star(self) -> None:
        cases = [
            ("*", "anything:at:all", True),
            ("ws:*", "ws:", True),  # empty run
            ("ws:*", "ws:1:doc", True),  # ':' included
            ("ws:*", "w", False),
            ("ws:*", "xws:1", False),
            ("*:doc", "ws:1:doc", True),
            ("*:doc", "ws:1:doc2", False),
            ("ws:*:doc", "ws::doc", True),
            ("ws:*:doc", "ws:1:2:doc", True),
            ("ws:*:doc", "ws:1:docx", False),
            ("a*b*c", "abc", True),
            ("a*b*c", "aXbYc", True),
            ("a*b*c", "acb", False),
            ("**", "", True),
            ("a**b", "ab", True),
            ("*a*a*a*a*a*a*a*a*a*b", "a" * 200, False),  # fast, no backtracking blow-up
        ]
        for pattern, room, expected in cases:
            self.assertEqual(room_pattern_matches(pattern, room), expected, (pattern, room))

    def test_may_join(self) -> None:
        self.assertTrue(may_join(["user:*", "ws:1:*"], "ws:1:doc"))
        self.assertFalse(may_join(["user:*", "ws:2:*"], "ws:1:doc"))
        self.assertFalse(may_join([], "ws:1:doc"))
        self.assertTrue(may_join(iter(["*"]), "x"))
        # Invalid room names are never joinable, whatever the patterns say.
        for bad in ("", "a b", "ws/1", "x" * 201, "room\n", "é"):
            self.assertFalse(may_join(["*", bad], bad), repr(bad))

    def test_regexes(self) -> None:
        self.assertTrue(ROOM_NAME_RE.match("ws:1:doc@x_y.z-w"))
        self.assertTrue(ROOM_NAME_RE.match("x" * 200))
        self.assertFalse(ROOM_NAME_RE.match("x" * 201))
        self.assertFalse(ROOM_NAME_RE.match("room\n"))
        self.assertTrue(USER_ID_RE.match("a.b-c_d@e"))
        self.assertFalse(USER_ID_RE.match("a:b"))
        self.assertFalse(USER_ID_RE.match("alice\n"))

    @given(st.from_regex(ROOM_NAME_RE))
    def test_pattern_equal_to_room_matches(self, room: str) -> None:
        self.assertTrue(room_pattern_matches(room, room))
        self.assertTrue(room_pattern_matches("*", room))
        self.assertTrue(may_join([room], room))
        self.assertTrue(may_join(["*"], room))

    @given(st.from_regex(ROOM_NAME_RE), st.data())
    def test_any_piece_replaced_by_star_matches(self, room: str, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(room)))
        j = data.draw(st.integers(i, len(room)))
        self.assertTrue(room_pattern_matches(room[:i] + "*" + room[j:], room))

    @given(
        st.text(alphabet="ab:*", max_size=12),
        st.text(alphabet="ab:", max_size=12),
    )
    def test_agrees_with_regex_reference(self, pattern: str, room: str) -> None:
        reference = ".*".join(re.escape(piece) for piece in pattern.split("*"))
        expected = re.fullmatch(reference, room, re.DOTALL) is not None
        self.assertEqual(room_pattern_matches(pattern, room), expected)


class VettedSecretTests(SynchronousTestCase):
    """The HS* algorithms vet a secret once, and still refuse asymmetric keys every time."""

    def test_a_secret_is_vetted_once(self) -> None:
        from jwt.algorithms import HMACAlgorithm

        from unrealon._compat.tokens import VettedSecretHMAC as _VettedSecretHMAC

        vetted: list[Any] = []
        original = HMACAlgorithm.prepare_key

        def counting(algorithm: Any, key: Any) -> bytes:
            vetted.append(key)
            return original(algorithm, key)

        self.patch(HMACAlgorithm, "prepare_key", counting)
        algorithm = _VettedSecretHMAC(HMACAlgorithm.SHA256)
        secret = "a-long-enough-hmac-secret-for-hs256!"
        for _ in range(3):
            self.assertEqual(algorithm.prepare_key(secret), secret.encode())
        self.assertEqual(vetted, [secret])

        public_pem = rsa_key(0).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for _ in range(2):
            self.assertRaises(jwt.InvalidKeyError, algorithm.prepare_key, public_pem)
        self.assertEqual(vetted, [secret, public_pem, public_pem])
