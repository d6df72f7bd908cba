"""JWT verification for unrealon-ws: connection tokens, room tokens and room patterns.

This is the pure layer under the WebSocket session (PROTOCOL.md section 2 and the room-token
paragraph of section 4). It never touches the network or the reactor loop; the only I/O is
reading key files in L{load_keys}, once, at startup.

Three choices differ from calling C{jwt.decode} with a key and an algorithm list:

- Key selection is ours. The token's header picks the algorithm, but only from the configured
  allow-list, and only with a key of that algorithm's family (HMAC, RSA, EC). An HS* token is
  therefore never checked against an RSA/EC public key: that is the classic algorithm
  confusion, where the public key, which everybody has, becomes an HMAC secret.
- Time claims (exp, nbf, iat) are checked against the injected clock, not the wall clock,
  so the session layer, its expiry timer and the tests all agree on "now".
- Refusals carry a short fixed reason (L{AuthError.reason}), never pyjwt's message, which may
  echo parts of the token, and never the token itself: reasons go to clients and to logs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

import attrs
import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from twisted.internet.interfaces import IReactorTime

from unrealon._compat.tokens import vetted_hmac_decoder
from unrealon.names import ROOM_NAME_RE, USER_ID_RE

__all__ = [
    "ROOM_NAME_RE",
    "SUPPORTED_ALGORITHMS",
    "USER_ID_RE",
    "AuthError",
    "Identity",
    "JWTSettings",
    "KeyConfigError",
    "RoomGrant",
    "TokenVerifier",
    "VerificationKey",
    "load_keys",
    "may_join",
    "room_pattern_matches",
    "validate_algorithms",
]


# Algorithm -> the family of key that may verify it. "none" is deliberately absent.
_FAMILY_OF: Mapping[str, str] = {
    "HS256": "HMAC",
    "HS384": "HMAC",
    "HS512": "HMAC",
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
}
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(_FAMILY_OF)
"""Every algorithm L{validate_algorithms} accepts."""

_MAX_INFO_BYTES = 1024
# Bounds the work one hostile token can cause (header parse, claim walk, rooms list);
# far above any sane token, which is a few hundred bytes to a few KiB.
_MAX_TOKEN_CHARS = 16 * 1024
#: verified tokens remembered (the oldest goes first): at most ~16 KiB each
VERIFIED_CACHE = 4096
_MAX_KEY_FILE_BYTES = 1024 * 1024
_MIN_RSA_BITS = 2048


class AuthError(Exception):
    """A token was refused.

    C{reason} is a short fixed message, safe to send to clients and to log: it never
    contains the token, a key or text from pyjwt (which may echo the input).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyConfigError(ValueError):
    """Bad key or algorithm configuration: unreadable or invalid key file, unknown algorithm.

    The message names the setting and the file but never contains key material.
    """


# Builds the KeyConfigError for one key file from a short "why".
_Fail = Callable[[str], KeyConfigError]


@attrs.frozen
class VerificationKey:
    """One key that may verify tokens.

    C{family} is "HMAC" (C{key} is the secret as bytes), "RSA" or "EC" (C{key} is a
    cryptography public key object). C{kid} is None for the JWT_SECRET key.
    """

    kid: str | None
    family: str = attrs.field(validator=attrs.validators.in_(("HMAC", "RSA", "EC")))
    key: object = attrs.field(repr=False)


def _check_algorithms(_: object, __: object, value: tuple[str, ...]) -> None:
    validate_algorithms(value)


def _check_leeway(_: object, __: object, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise KeyConfigError("JWT_LEEWAY: must be a finite number of seconds, 0 or more")


@attrs.frozen
class JWTSettings:
    """What L{TokenVerifier} accepts: keys, algorithm allow-list, aud/iss, time leeway (s).

    The algorithm list is validated here too, so "none" cannot slip in by any route.
    """

    keys: tuple[VerificationKey, ...]
    algorithms: tuple[str, ...] = attrs.field(default=("HS256",), validator=_check_algorithms)
    audience: str | None = None
    issuer: str | None = None
    leeway: float = attrs.field(default=5.0, validator=_check_leeway)


@attrs.frozen
class Identity:
    """The identity a verified connection token grants.

    C{expires_at} is the exp claim (epoch seconds, leeway not added). C{info} is the
    claim's plain dict (C{{}} when absent), so it serialises to JSON as is.
    """

    user_id: str
    expires_at: float
    info: Mapping[str, Any]
    room_patterns: tuple[str, ...]
    #: the C{methods} claim: backend methods this user may call (PROTOCOL.md section 9)
    method_patterns: tuple[str, ...] = ()
    #: the token's claims, kept only when it may call backend methods (a
    #: declaration may pass some on to its worker); empty otherwise
    claims: Mapping[str, Any] = attrs.field(factory=dict, repr=False)


@attrs.frozen
class RoomGrant:
    """Admission to one room, from a verified room token."""

    room: str
    user_id: str
    expires_at: float


def validate_algorithms(algorithms: Sequence[str]) -> tuple[str, ...]:
    """Return the allow-list without duplicates, or raise L{KeyConfigError} naming a bad entry.

    "none" and anything not in L{SUPPORTED_ALGORITHMS} are refused; names are case-sensitive.
    """
    if isinstance(algorithms, str):
        # A bare string is a sequence of one-letter "algorithms": a caller bug, say so.
        raise KeyConfigError("JWT_ALGORITHMS: expected a list of algorithm names")
    result: list[str] = []
    for name in algorithms:
        if name not in _FAMILY_OF:
            raise KeyConfigError(
                f"JWT_ALGORITHMS: algorithm {name!r} is not allowed "
                f"(choose from {', '.join(SUPPORTED_ALGORITHMS)})"
            )
        if name not in result:
            result.append(name)
    if not result:
        raise KeyConfigError("JWT_ALGORITHMS: at least one algorithm is required")
    return tuple(result)


def load_keys(secret: str | None, public_key_files: Sequence[str]) -> tuple[VerificationKey, ...]:
    """Build the verification keys from JWT_SECRET and JWT_PUBLIC_KEY_FILE.

    C{secret} gives one HMAC key (kid None). Each file is a PEM public key or certificate
    (RSA or EC; kid = the file name without its extension) or a JWKS document
    (C{{"keys": [...]}}, one key per signing entry, kid from the entry). Raises
    L{KeyConfigError}, whose message never contains key material. No keys at all gives C{()}:
    whether that is acceptable (insecure dev mode) is the caller's decision.
    """
    keys: list[VerificationKey] = []
    if secret is not None:
        keys.append(_secret_key(secret))
    for path in public_key_files:
        keys.extend(_load_key_file(path))
    return tuple(keys)


def _secret_key(secret: str) -> VerificationKey:
    if not secret:
        raise KeyConfigError("JWT_SECRET: must not be empty")
    raw = secret.encode("utf-8")
    try:
        # pyjwt refuses PEM/SSH/DER text as an HMAC secret (algorithm confusion); so do we,
        # at startup rather than on every token.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(raw)
    except jwt.InvalidKeyError:
        raise KeyConfigError(
            "JWT_SECRET: looks like a public key or certificate; give those in JWT_PUBLIC_KEY_FILE"
        ) from None
    return VerificationKey(kid=None, family="HMAC", key=raw)


def _load_key_file(path: str) -> list[VerificationKey]:
    def fail(why: str) -> KeyConfigError:
        return KeyConfigError(f"JWT_PUBLIC_KEY_FILE: cannot read {path}: {why}")

    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        # strerror only ("No such file or directory"), not str(e): nothing else leaks in.
        raise fail(e.strerror or type(e).__name__) from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise fail("file too large for a key file")
    if data.lstrip().startswith(b"{"):
        return _load_jwks(data, fail)
    return [_load_pem(data, Path(path).stem, fail)]


def _load_pem(data: bytes, kid: str, fail: _Fail) -> VerificationKey:
    if b"PRIVATE KEY-----" in data:
        raise fail("it holds a private key; give the public key only")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public_key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # cryptography's message is not needed and not shown: the file may be a secret.
        raise fail("not a PEM public key, certificate or JWKS") from None
    return _public_key(public_key, kid, fail)


def _load_jwks(data: bytes, fail: _Fail) -> list[VerificationKey]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise fail("not valid JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise fail('not a JWKS: no "keys" list')
    keys: list[VerificationKey] = []
    for index, entry in enumerate(entries):
        where = f"key #{index}"
        if not isinstance(entry, dict):
            raise fail(f"{where} is not a JSON object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise fail(f"{where} has a non-string kid")
        if kid is not None:
            where = f"key {kid!r}"
        if entry.get("use", "sig") != "sig":
            continue  # encryption keys share JWKS documents; they never verify signatures
        try:
            key = jwt.PyJWK(entry).key
        except Exception:
            # Broad on purpose: PyJWK raises many types (NotImplementedError for
            # "alg": "none"), and its messages embed the whole JWK, secret parts included.
            raise fail(f"{where} is not a usable signing key") from None
        if isinstance(key, bytes):
            keys.append(VerificationKey(kid=kid, family="HMAC", key=key))
        else:
            keys.append(_public_key(key, kid, fail, where))
    if not keys:
        raise fail("the JWKS holds no signing key")
    return keys


def _public_key(
    key: object, kid: str | None, fail: _Fail, where: str = "the key"
) -> VerificationKey:
    # A JWK with private parts loads as a private key; only its public half is needed.
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        key = key.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise fail(f"{where} is a {key.key_size}-bit RSA key; at least {_MIN_RSA_BITS} needed")
        return VerificationKey(kid=kid, family="RSA", key=key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return VerificationKey(kid=kid, family="EC", key=key)
    raise fail(f"{where} is neither an RSA nor an EC key")


class _Clock(Protocol):
    def seconds(self) -> float: ...


class TokenVerifier:
    """Verifies connection tokens and room tokens against L{JWTSettings}.

    C{clock.seconds()} is "now" for exp/nbf/iat. Every refusal is an L{AuthError}.
    """

    def __init__(self, settings: JWTSettings, clock: IReactorTime) -> None:
        self._settings = settings
        #: token -> its verified claims (signature, algorithm, key, aud, iss):
        #: a reconnecting browser shows the same token again, and a reconnect
        #: storm would otherwise verify thousands of signatures already
        #: verified.  Times (exp, nbf) are checked again on every use.
        self._verified: dict[str, dict[str, Any]] = {}
        # cast: without the mypy-zope plugin mypy cannot see IReactorTime.seconds as a method.
        self._clock = cast(_Clock, clock)
        self._jwt = vetted_hmac_decoder()
        self._options: jwt.types.Options = {
            "require": ["exp"],
            # Time claims are checked by _check_times against the injected clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            # pyjwt refuses a token with aud when no audience is expected; the protocol
            # accepts it, so aud is only verified when configured. Same for iss.
            "verify_aud": settings.audience is not None,
            "verify_iss": settings.issuer is not None,
            # pyjwt wants sub to be a string; the protocol also accepts a number (_user_id).
            "verify_sub": False,
            "verify_jti": False,
        }

    def verify_connection_token(self, token: str) -> Identity:
        """Return the identity a connection token grants, or raise L{AuthError}."""
        claims, expires_at = self._decode(token)
        if "room" in claims:
            raise AuthError("room token not accepted here")
        methods = _methods(claims)
        return Identity(
            user_id=_user_id(claims),
            expires_at=expires_at,
            info=_info(claims),
            room_patterns=_rooms(claims),
            method_patterns=methods,
            claims=claims if methods else _NO_CLAIMS,
        )

    def verify_room_token(self, token: str, user_id: str, room: str) -> RoomGrant:
        """Admit C{user_id} to C{room} with a room token, or raise L{AuthError}."""
        claims, expires_at = self._decode(token)
        if "room" not in claims:
            raise AuthError("room token required")
        if _user_id(claims) != user_id:
            raise AuthError("room token is for another user")
        if not isinstance(claims["room"], str):
            raise AuthError("invalid token")
        if claims["room"] != room:
            raise AuthError("room token is for another room")
        return RoomGrant(room=room, user_id=user_id, expires_at=expires_at)

    def _decode(self, token: str) -> tuple[dict[str, Any], float]:
        """Verify signature and standard claims; return the claims and exp."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            raise AuthError("invalid token")
        known = self._verified.get(token)
        if known is not None:
            try:
                return known, self._check_times(known)
            except AuthError:
                del self._verified[token]  # expired: it can never be good again
                raise
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.algorithms:
            raise AuthError("algorithm not allowed")
        family = _FAMILY_OF.get(alg)
        if family is None:  # unreachable with validated settings; kept as a second lock
            raise AuthError("algorithm not allowed")

        candidates = self._settings.keys
        kid = header.get("kid")  # pyjwt has checked it is a string when present
        if kid is not None:
            candidates = tuple(k for k in candidates if k.kid == kid)
            if not candidates:
                raise AuthError("unknown key id")
        # The algorithm-confusion guard: a key only ever verifies its own family.
        candidates = tuple(k for k in candidates if k.family == family)
        if not candidates:
            raise AuthError("algorithm not allowed")

        claims = self._decode_with(token, alg, candidates)
        expires_at = self._check_times(claims)
        if len(self._verified) >= VERIFIED_CACHE:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = claims
        return claims, expires_at

    def _decode_with(
        self, token: str, alg: str, candidates: tuple[VerificationKey, ...]
    ) -> dict[str, Any]:
        for key in candidates:
            try:
                claims: dict[str, Any] = self._jwt.decode(
                    token,
                    key.key,  # type: ignore[arg-type]  # family-checked above
                    algorithms=[alg],
                    options=self._options,
                    audience=self._settings.audience,
                    issuer=self._settings.issuer,
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                # Not this key (InvalidKeyError: e.g. a P-384 key for an ES256 token).
                continue
            # pyjwt checks claims only once the signature holds, so these reasons are only
            # ever told to the holder of a validly signed token.
            except jwt.MissingRequiredClaimError as e:
                reason = {"aud": "invalid audience", "iss": "invalid issuer"}.get(
                    e.claim, "token has no expiry"
                )
                raise AuthError(reason) from None
            except jwt.InvalidAudienceError:
                raise AuthError("invalid audience") from None
            except jwt.InvalidIssuerError:
                raise AuthError("invalid issuer") from None
            except jwt.PyJWTError:
                raise AuthError("invalid token") from None
            return claims
        raise AuthError("invalid signature")

    def _check_times(self, claims: Mapping[str, Any]) -> float:
        now = self._clock.seconds()
        leeway = self._settings.leeway
        exp = _numeric_date(claims.get("exp"))
        if exp is None:
            raise AuthError("invalid token")
        if exp + leeway < now:
            raise AuthError("token expired")
        for name, reason in (
            ("nbf", "token not yet valid"),
            ("iat", "token issued in the future"),
        ):
            if name in claims:
                value = _numeric_date(claims[name])
                if value is None:
                    raise AuthError("invalid token")
                if value - leeway > now:
                    raise AuthError(reason)
        return exp


def _numeric_date(value: object) -> float | None:
    """A JWT NumericDate as float, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return result if math.isfinite(result) else None


def _user_id(claims: Mapping[str, Any]) -> str:
    value = claims.get("sub")
    if value is None:
        value = claims.get("user_id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not USER_ID_RE.match(value):
        raise AuthError("invalid user id")
    return value


def _info(claims: Mapping[str, Any]) -> dict[str, Any]:
    if "info" not in claims:
        return {}
    info = claims["info"]
    if not isinstance(info, dict):
        raise AuthError("invalid info claim")
    encoded = json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(encoded) > _MAX_INFO_BYTES:
        raise AuthError("info claim too large")
    return info


_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


def _methods(claims: Mapping[str, Any]) -> tuple[str, ...]:
    methods = claims.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise AuthError("invalid methods claim")
    return tuple(methods)


def _rooms(claims: Mapping[str, Any]) -> tuple[str, ...]:
    rooms = claims.get("rooms", [])
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise AuthError("invalid rooms claim")
    return tuple(rooms)


def room_pattern_matches(pattern: str, room: str) -> bool:
    """Whether C{room} fully matches C{pattern}.

    C{*} matches any run of characters (empty, and ':' included); everything else is
    literal and case-sensitive.
    """
    # Hand-written rather than a regex of ".*"-joined pieces: re backtracks polynomially
    # on patterns like "*a*a*a*b" against a long non-matching room (room names come from
    # clients); this greedy matcher with one backtrack point is O(len(pattern) * len(room)).
    if "*" not in pattern:
        return pattern == room
    p = r = 0
    star = -1  # index of the last '*' seen in pattern
    resume = 0  # position in room where that '*' currently stops
    while r < len(room):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, r
            p += 1
        elif p < len(pattern) and pattern[p] == room[r]:
            p += 1
            r += 1
        elif star >= 0:
            # Let the last '*' swallow one more character and retry from there.
            resume += 1
            p, r = star + 1, resume
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def may_join(patterns: Iterable[str], room: str) -> bool:
    """Whether a valid room name matches any of a token's C{rooms} patterns."""
    if not ROOM_NAME_RE.match(room):
        return False
    return any(room_pattern_matches(pattern, room) for pattern in patterns)
