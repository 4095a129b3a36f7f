"""In-memory fakes of the `KeyStore` and `ApprovalStore` ports for unit tests of the approval
service: one lock makes `apply_approval` as atomic as the SQL stores' transaction."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from broker.domain import ApprovalRequest, ApprovalState, Key
from broker.errors import AlreadyExists, ConcurrentModification, NotFound


class FakeKeyStore:
    """Keys by id, compare-and-set on revision."""

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}
        self.lock = threading.RLock()

    def create_key(self, key: Key) -> None:
        with self.lock:
            if key.key_id in self.keys:
                raise AlreadyExists(f"key {key.key_id!r} already exists")
            self.keys[key.key_id] = key

    def get_key(self, key_id: str) -> Key:
        with self.lock:
            if key_id not in self.keys:
                raise NotFound(f"key {key_id!r} not found")
            return self.keys[key_id]

    def list_keys(self, after: str, limit: int) -> list[Key]:
        with self.lock:
            return [self.keys[k] for k in sorted(self.keys) if k > after][:limit]

    def update_key(self, key: Key, expected_revision: int) -> Key:
        with self.lock:
            current = self.get_key(key.key_id)
            if current.revision != expected_revision:
                raise ConcurrentModification(f"key {key.key_id!r} was changed concurrently")
            stored = key.evolve(revision=expected_revision + 1)
            self.keys[key.key_id] = stored
            return stored


class FakeApprovalStore:
    """Approval requests by id; shares the key store's lock so that applying a request and
    changing its key happen together or not at all.

    Args:
        keys: the key store the approved changes are written to.
    """

    def __init__(self, keys: FakeKeyStore) -> None:
        self._keys = keys
        self.requests: dict[str, ApprovalRequest] = {}
        #: How many changes `apply_approval` has stored (the "exactly once" tests count them).
        self.applied = 0

    def create_approval(self, request: ApprovalRequest) -> None:
        with self._keys.lock:
            if request.request_id in self.requests:
                raise AlreadyExists(f"approval request {request.request_id!r} exists")
            self.requests[request.request_id] = request

    def get_approval(self, request_id: str) -> ApprovalRequest:
        with self._keys.lock:
            if request_id not in self.requests:
                raise NotFound(f"approval request {request_id!r} not found")
            return self.requests[request_id]

    def list_approvals(
        self, after: str, limit: int, states: Sequence[ApprovalState] = (), key_id: str = ""
    ) -> list[ApprovalRequest]:
        with self._keys.lock:
            found = [
                r
                for i, r in sorted(self.requests.items())
                if i > after
                and (not states or r.state in states)
                and (not key_id or r.key_id == key_id)
            ]
            return found[:limit]

    def update_approval(self, request: ApprovalRequest, expected_revision: int) -> ApprovalRequest:
        with self._keys.lock:
            current = self.get_approval(request.request_id)
            if current.revision != expected_revision:
                raise ConcurrentModification("approval request changed concurrently")
            stored = request.evolve(revision=expected_revision + 1)
            self.requests[request.request_id] = stored
            return stored

    def apply_approval(
        self,
        request: ApprovalRequest,
        expected_revision: int,
        key: Key,
        expected_key_revision: int,
    ) -> tuple[ApprovalRequest, Key]:
        with self._keys.lock:
            if self.get_approval(request.request_id).revision != expected_revision:
                raise ConcurrentModification("approval request changed concurrently")
            if self._keys.get_key(key.key_id).revision != expected_key_revision:
                raise ConcurrentModification(f"key {key.key_id!r} was changed concurrently")
            stored_key = self._keys.update_key(key, expected_key_revision)
            stored = self.update_approval(request, expected_revision)
            self.applied += 1
            return stored, stored_key
