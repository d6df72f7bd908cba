"""
pyjwt: a decoder whose HMAC algorithms vet each secret once.

pyjwt's C{HMACAlgorithm.prepare_key} re-examines the secret on every
verification (is it a PEM or DER key, an SSH key, a JWK in disguise?): a
tenth of the server's CPU per connection in the connect benchmark.  The
verdict for a given secret never changes, and secrets come only from our
settings, never from a token.  pyjwt keeps its algorithm registry on the
C{PyJWS} inside a C{PyJWT} (C{PyJWT._jws}), with no public way to reach it
from a decoder.  Upstream: cache the prepared key per secret in pyjwt, or
accept C{algorithms} objects in C{PyJWT()}.
"""

from __future__ import annotations

from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

from unrealon._compat import require


def check() -> None:
    require("pyjwt", jwt.PyJWT(), ("_jws",))
    require("pyjwt", jwt.PyJWS, ("register_algorithm", "unregister_algorithm"))
    require("pyjwt", HMACAlgorithm, ("prepare_key", "SHA256", "SHA384", "SHA512"))


class VettedSecretHMAC(HMACAlgorithm):
    """
    pyjwt's HMAC algorithm, vetting each secret once.

    pyjwt's C{prepare_key} re-examines the secret on every verification (is
    it a PEM or DER key, an SSH key, a JWK in disguise?): a tenth of the
    server's CPU per connection in the connect benchmark.  The verdict for a
    given secret never changes, and secrets come only from our settings,
    never from a token, so this keeps at most one entry per configured key.
    """

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._vetted: dict[Any, bytes] = {}

    def prepare_key(self, key: Any) -> bytes:
        vetted = self._vetted.get(key)
        if vetted is None:
            vetted = self._vetted[key] = super().prepare_key(key)
        return vetted


def vetted_hmac_decoder() -> jwt.PyJWT:
    """A pyjwt decoder of our own whose HS* algorithms vet each secret once."""
    decoder = jwt.PyJWT()
    jws = decoder._jws  # pyjwt keeps the algorithm registry on its PyJWS
    for name, hash_alg in (
        ("HS256", HMACAlgorithm.SHA256),
        ("HS384", HMACAlgorithm.SHA384),
        ("HS512", HMACAlgorithm.SHA512),
    ):
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, VettedSecretHMAC(hash_alg))
    return decoder


check()
