-- The schema as the broker made it before versioned migrations: a database of that time is
-- adopted as version 1 as it stands (every statement is IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issued_tokens (
    token_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    key_id TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS token_uses (
    token_id TEXT PRIMARY KEY,
    uses BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    token_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    hsm TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    chain TEXT NOT NULL,
    chain_sequence INTEGER NOT NULL,
    time TEXT NOT NULL,
    principal TEXT NOT NULL,
    operation TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_version INTEGER NOT NULL,
    token_id TEXT NOT NULL,
    context TEXT NOT NULL,
    justification TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    request_id TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_by_chain ON audit_events (chain, chain_sequence);
CREATE INDEX IF NOT EXISTS audit_events_by_key ON audit_events (key_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_by_principal ON audit_events (principal, sequence);
CREATE TABLE IF NOT EXISTS audit_chains (
    chain TEXT PRIMARY KEY,
    writer TEXT NOT NULL,
    time TEXT NOT NULL,
    jws TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chain TEXT NOT NULL,
    chain_sequence INTEGER NOT NULL,
    head TEXT NOT NULL,
    time TEXT NOT NULL,
    closed INTEGER NOT NULL,
    jws TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_checkpoints_by_chain ON audit_checkpoints (chain, chain_sequence);
