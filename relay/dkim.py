"""DKIM signing (RFC 6376, RFC 8463) with the keys of the message's `From:` domain.

Owns key generation for `postroom domains add` (RSA-2048, optionally ed25519), the DNS TXT records
that publish them, and `Signer`: the DKIM-Signature header(s) for the exact bytes that go on the
wire — rsa-sha256, plus ed25519-sha256 when the domain has that key (never ed25519 alone: some
receivers still fail it), relaxed/relaxed, never `l=`. `KeyRing` looks keys up in the spool with
a short cache. dkimpy does the canonicalisation, header selection and verification; its RSA step
is replaced by a `cryptography` one (see `_fast_rsa_sign`). dkimpy's exceptions stay here.
"""

from __future__ import annotations

import base64
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from store import DomainKeys, UnreadableKeys

# Headers signed when present. Identity and display headers are over-signed (listed once more
# than they occur) so that nobody can add a second copy after signing; List-Unsubscribe and
# List-Unsubscribe-Post must be signed whenever present (RFC 8058 §4).
_OVERSIGNED = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "sender", "content-type",
    "mime-version", "list-unsubscribe", "list-unsubscribe-post",
)
_SIGNED = (
    *_OVERSIGNED, "in-reply-to", "references", "content-transfer-encoding", "list-id",
    "list-help", "list-post", "feedback-id",
)
_CANONICALIZE = (b"relaxed", b"relaxed")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_FROM_HEADER = re.compile(rb"^From[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.MULTILINE | re.I)


class DkimError(Exception):
    """A message or key that cannot be signed; the engine records the message `failed`."""


# -- the fast RSA step ------------------------------------------------------------------------
#
# dkimpy computes RSA signatures with pure-Python big integers: about 6 ms per message for a
# 2048-bit key, which would cap delivery near 160 msgs/s per core. Its signer calls
# `RSASSA_PKCS1_v1_5_sign(hash, private_key)` (the key as dkimpy's parsed dict of integers) by
# the name imported into the `dkim` package, so that name — not `dkim.crypto`'s — is the one
# replaced below with OpenSSL's implementation through `cryptography`. The signature is the same
# RFC 8017 RSASSA-PKCS1-v1_5 over the same digest; dkimpy verifies it in the tests. dkimpy is
# pinned below its next minor version (pyproject.toml) because this relies on its internals;
# `is_fast_rsa_in_use()` is asserted by a test.

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # noqa: S303 - rsa-sha1 only if a caller asks for it
_KEY_CACHE: OrderedDict[int, rsa.RSAPrivateKey] = OrderedDict()
_KEY_CACHE_SIZE = 1024


def _rsa_key(fields: dict[str, int]) -> rsa.RSAPrivateKey:
    """The OpenSSL key for dkimpy's parsed key, built once per modulus (building costs ~ms)."""
    modulus = fields["modulus"]
    key = _KEY_CACHE.get(modulus)
    if key is None:
        numbers = rsa.RSAPrivateNumbers(
            p=fields["prime1"],
            q=fields["prime2"],
            d=fields["privateExponent"],
            dmp1=fields["exponent1"],
            dmq1=fields["exponent2"],
            iqmp=fields["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(fields["publicExponent"], modulus),
        )
        key = numbers.private_key()
        _KEY_CACHE[modulus] = key
        if len(_KEY_CACHE) > _KEY_CACHE_SIZE:
            _KEY_CACHE.popitem(last=False)
    return key


def _fast_rsa_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """Drop-in for `dkim.crypto.RSASSA_PKCS1_v1_5_sign`, computed by OpenSSL."""
    algorithm = _HASHES[hash.name]
    return _rsa_key(private_key).sign(
        hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm)
    )


_PEM_CACHE: OrderedDict[bytes, dict[str, int]] = OrderedDict()
_dkimpy_parse_pem = dkim.parse_pem_private_key


def _cached_parse_pem(data: bytes) -> dict[str, int]:
    """dkimpy parses the PEM key in pure Python on every signature: parse each key once."""
    fields = _PEM_CACHE.get(data)
    if fields is None:
        fields = _dkimpy_parse_pem(data)
        _PEM_CACHE[data] = fields
        if len(_PEM_CACHE) > _KEY_CACHE_SIZE:
            _PEM_CACHE.popitem(last=False)
    return fields


dkim.RSASSA_PKCS1_v1_5_sign = _fast_rsa_sign
dkim.parse_pem_private_key = _cached_parse_pem


def is_fast_rsa_in_use() -> bool:
    """True while dkimpy's signer calls OpenSSL for RSA (the name it calls is ours)."""
    return dkim.RSASSA_PKCS1_v1_5_sign is _fast_rsa_sign


# -- keys and records ---------------------------------------------------------------------------


def generate_keys(domain: str, selector: str, with_ed25519: bool, now: float) -> DomainKeys:
    """New keys for `domain`: RSA-2048, and ed25519 too when asked."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # dkimpy reads PKCS#1 and PKCS#8; PKCS#1 ("BEGIN RSA PRIVATE KEY") is what it documents.
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    seed = None
    if with_ed25519:
        ed = ed25519.Ed25519PrivateKey.generate()
        raw = ed.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        seed = base64.b64encode(raw)
    return DomainKeys(
        name=domain, selector=selector, rsa_key=pem, ed25519_key=seed, created_at=now
    )


@dataclass(frozen=True, slots=True)
class TxtRecord:
    name: str  # the DNS name, e.g. postroom._domainkey.example.com
    value: str


def txt_records(keys: DomainKeys) -> list[TxtRecord]:
    """The TXT records that publish a domain's public keys (RFC 6376 §3.6.1, RFC 8463 §4)."""
    private = serialization.load_pem_private_key(keys.rsa_key, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    records = [
        TxtRecord(
            f"{keys.selector}._domainkey.{keys.name}",
            f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}",
        )
    ]
    if keys.ed25519_key is not None:
        seed = base64.b64decode(keys.ed25519_key)
        public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        records.append(
            TxtRecord(
                f"{keys.ed25519_selector}._domainkey.{keys.name}",
                f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}",
            )
        )
    return records


# -- signing ------------------------------------------------------------------------------------


def from_domain(content: bytes) -> str | None:
    """The domain of the (first) `From:` address in the message's header, lower case."""
    head = content.split(b"\r\n\r\n", 1)[0]
    match = _FROM_HEADER.search(head)
    return None if match is None else _domain_of_from(match.group(1))


@functools.lru_cache(maxsize=1024)
def _domain_of_from(raw: bytes) -> str | None:
    """The domain of a `From:` field's first address. Remembered: bulk mail repeats one From
    across thousands of messages, and the address parser was ~4% of a delivery's CPU."""
    value = raw.decode("utf-8", "replace").replace("\r\n", "")
    for _, address in getaddresses([value]):
        if "@" in address:
            return address.rpartition("@")[2].rstrip(".").lower()
    return None


def headers_to_sign(content: bytes) -> list[bytes]:
    """The `h=` list: signed headers as often as they occur, over-signed ones once more.

    The identity headers are listed once more even when the message has none: a name in `h=`
    with no field left to sign signs its absence (RFC 6376 §5.4.2), so nobody can add a
    `Reply-To:`, `Sender:` or `Cc:` after signing without breaking the signature.
    """
    head = content.split(b"\r\n\r\n", 1)[0]
    present = [m.group(1).lower() for m in _HEADER_NAME.finditer(head)]
    names = [n for n in present if n.decode("ascii", "replace") in _SIGNED]
    names += [n.encode() for n in _OVERSIGNED]
    return names


class Signer:
    """Signs messages for one domain."""

    def __init__(self, keys: DomainKeys) -> None:
        self._keys = keys
        self._domain = keys.name.encode()

    @property
    def keys(self) -> DomainKeys:
        return self._keys

    def sign(self, content: bytes) -> bytes:
        """`content` with DKIM-Signature header(s) prepended; raises DkimError."""
        include = headers_to_sign(content)
        try:
            header: bytes = dkim.sign(
                content,
                self._keys.selector.encode(),
                self._domain,
                self._keys.rsa_key,
                canonicalize=_CANONICALIZE,
                signature_algorithm=b"rsa-sha256",
                include_headers=include,
                length=False,
            )
            if self._keys.ed25519_key is not None:
                header = dkim.sign(
                    content,
                    self._keys.ed25519_selector.encode(),
                    self._domain,
                    self._keys.ed25519_key,
                    canonicalize=_CANONICALIZE,
                    signature_algorithm=b"ed25519-sha256",
                    include_headers=include,
                    length=False,
                ) + header
        except dkim.DKIMException as exc:
            raise DkimError(f"cannot sign for {self._keys.name}: {exc}") from None
        return header + content


#: Signs `content` with a domain's keys, somewhere: `sign_here` in this process, or an SMTP
#: worker process (relay/workers.py) so that the service's loop is free for the rest.
SignWith = Callable[[DomainKeys, bytes], Awaitable[bytes]]


def sign_message(keys: DomainKeys, content: bytes) -> bytes:
    """`content` signed with `keys` (a function by reference: what a worker is handed)."""
    return Signer(keys).sign(content)


async def sign_here(keys: DomainKeys, content: bytes) -> bytes:
    return sign_message(keys, content)


class KeyRing:
    """The signer for a message's From domain, or None; looked up in the spool, cached briefly.

    The cache (hits, misses and keys that do not decrypt) lasts `ttl` seconds, so a domain added
    or repaired while Postroom runs signs within that time, and it holds at most `size` domains.
    A domain whose stored keys do not decrypt raises DkimError: its mail is not sent unsigned.
    """

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[DomainKeys | None]],
        ttl: float = 60.0,
        size: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Signer | DkimError | None]] = OrderedDict()

    async def signer_for(self, content: bytes) -> Signer | None:
        """The From domain's signer, None when it has no keys; DkimError when they are broken."""
        domain = from_domain(content)
        if domain is None:
            return None
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            signer = cached[1]
        else:
            signer = await self._load(domain)
            self._cache[domain] = (now + self._ttl, signer)
            self._cache.move_to_end(domain)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        if isinstance(signer, DkimError):
            raise DkimError(str(signer))
        return signer

    async def _load(self, domain: str) -> Signer | DkimError | None:
        try:
            keys = await self._lookup(domain)
        except UnreadableKeys as exc:  # its message names domain and selector, never the key
            return DkimError(str(exc))
        return None if keys is None else Signer(keys)
