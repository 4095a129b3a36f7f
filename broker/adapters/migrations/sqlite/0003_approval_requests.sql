-- Changes to keys that wait for approval by several admins (`approvals.required`,
-- docs/lifecycle.md). `data` is the request as JSON; `key_id` and `state` are copies of its
-- fields that listings filter on. Updates are compare-and-set on `revision`.
CREATE TABLE IF NOT EXISTS approval_requests (
    request_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approval_requests_by_state ON approval_requests (state, request_id);
CREATE INDEX IF NOT EXISTS approval_requests_by_key ON approval_requests (key_id, request_id);
