"""Verified tokens, remembered for their lifetime so a token is verified once per process.

Verifying an ES256 token (base64 and strict JSON parsing, the ECDSA check, claim decoding) is
the most expensive step of a Decrypt that the HSM does not do. A service presents the same
token on every call of a batch, so the outcome of those steps is kept, keyed by the SHA-256 of
the token's exact bytes: a hit means the very same bytes were verified before. Only what does
not change while a token lives is cached. Its expiry, its binding to the calling certificate,
its revocation, its use count, the key's state and the policy are checked on every call.

Only successful verifications are kept; a refused token is verified again each time.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from datetime import datetime

from broker.domain import TokenClaims

#: Entries kept at most. At 64 bytes of key and one small claims object each, 10,000 tokens
#: cost a few MiB, far more distinct tokens than one process sees within their lifetime.
DEFAULT_MAX_ENTRIES = 10_000


class VerifiedTokenCache:
    """A bounded, least-recently-used map from a token's digest to its verified claims.

    Thread-safe. An entry is dropped once its token has expired (by the time the caller
    passes), and the least recently used entry goes when the cache is full.

    Args:
        max_entries: the most tokens remembered; 0 turns the cache off.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be zero or positive")
        self._max = max_entries
        self._entries: OrderedDict[bytes, TokenClaims] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @staticmethod
    def digest(token: str) -> bytes:
        """The cache key of a token: SHA-256 of its bytes."""
        return hashlib.sha256(token.encode()).digest()

    def get(self, digest: bytes, now: datetime) -> TokenClaims | None:
        """The claims of a token verified before and not yet expired at `now`, else None."""
        with self._lock:
            claims = self._entries.get(digest)
            if claims is None:
                return None
            if now >= claims.expires_at:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return claims

    def put(self, digest: bytes, claims: TokenClaims) -> None:
        """Remembers the claims of a token whose signature and claims were just verified."""
        if not self._max:
            return
        with self._lock:
            self._entries[digest] = claims
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
