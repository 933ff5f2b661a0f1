"""The one schema of Ferry's state database, as an ordered list of versioned migrations.

`PRAGMA user_version` records the last migration applied. A migration is never edited once
released: a change is a new entry at the end. Each entry is applied in its own transaction
together with the `user_version` bump, so a crash leaves the database at a whole version.
"""
from __future__ import annotations

import sqlite3

__all__ = ["MIGRATIONS", "LATEST_VERSION", "statements"]

_V1_KEYS_USERS = """
CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    prefix         TEXT NOT NULL,
    hash           BLOB NOT NULL,
    scopes         TEXT NOT NULL,          -- JSON list
    models         TEXT,                   -- JSON list of patterns; NULL: every model
    rpm            INTEGER,
    tpm            INTEGER,
    max_concurrent INTEGER,
    expires_at     REAL,                   -- Unix seconds; NULL: never
    allow_ips      TEXT NOT NULL,          -- JSON list of CIDRs; empty: any address
    created_at     REAL NOT NULL,
    rotated_at     REAL,
    revoked_at     REAL
);
CREATE TABLE users (
    username       TEXT PRIMARY KEY,
    password_hash  TEXT NOT NULL,          -- scrypt$n$r$p$salt$hash (base64)
    token_version  INTEGER NOT NULL DEFAULT 1,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);
"""

_V2_REQUEST_LOG = """
CREATE TABLE request_log (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    ts                REAL NOT NULL,
    request_id        TEXT NOT NULL,
    key_id            TEXT,
    model             TEXT,
    route             TEXT NOT NULL,
    status            INTEGER NOT NULL,
    code              TEXT,
    queue_ms          REAL,
    ttft_ms           REAL,
    total_ms          REAL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    body              TEXT
);
CREATE INDEX request_log_ts ON request_log (ts);
CREATE INDEX request_log_model ON request_log (model, id);
CREATE INDEX request_log_key ON request_log (key_id, id);
"""

_V3_BATCHES = """
CREATE TABLE batch_jobs (
    id             TEXT PRIMARY KEY,
    route          TEXT NOT NULL,
    model          TEXT,
    status         TEXT NOT NULL,
    total          INTEGER NOT NULL,
    webhook_url    TEXT,
    webhook_secret TEXT,
    metadata       TEXT,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    completed_at   REAL
);
CREATE INDEX batch_jobs_created ON batch_jobs (created_at);
CREATE TABLE batch_items (
    job_id      TEXT NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    custom_id   TEXT,
    request     TEXT NOT NULL,
    status      TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  REAL,
    finished_at REAL,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX batch_items_status ON batch_items (job_id, status);
CREATE TABLE webhook_deliveries (
    job_id          TEXT PRIMARY KEY REFERENCES batch_jobs (id) ON DELETE CASCADE,
    url             TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    last_status     INTEGER,
    last_error      TEXT,
    claimed_until   REAL,
    delivered_at    REAL
);
"""

# Prompt templates (frontends/http/prompt_templates.py): versions are immutable, numbered from
# 1 per name. Custom metrics (frontends/http/custom_metrics.py): one row per series, `labels`
# the series' label set as canonical JSON (sorted keys), so every HTTP worker reads one value.
_V4_TEMPLATES_METRICS = """
CREATE TABLE prompt_templates (
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    source      TEXT NOT NULL,
    description TEXT,
    created_at  REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE custom_metrics (
    name        TEXT NOT NULL,
    labels      TEXT NOT NULL,
    kind        TEXT NOT NULL,             -- gauge | counter
    help        TEXT NOT NULL,
    value       REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (name, labels)
);
"""

# Recent trace spans (frontends/http/tracing.py): a bounded ring, pruned to the newest rows, so
# GET /traces on any HTTP worker sees the spans every worker recorded.
_V5_TRACE_SPANS = """
CREATE TABLE trace_spans (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id       TEXT NOT NULL,
    span_id        TEXT NOT NULL,
    parent_span_id TEXT,
    name           TEXT NOT NULL,
    start          REAL NOT NULL,              -- Unix seconds
    duration_ms    REAL NOT NULL,
    status         TEXT NOT NULL,              -- ok | error
    attributes     TEXT NOT NULL               -- JSON object
);
CREATE INDEX trace_spans_trace ON trace_spans (trace_id);
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, _V1_KEYS_USERS),
    (2, _V2_REQUEST_LOG),
    (3, _V3_BATCHES),
    (4, _V4_TEMPLATES_METRICS),
    (5, _V5_TRACE_SPANS),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def statements(script: str) -> list[str]:
    """Split a migration script into complete statements.

    `executescript` would commit before running, which breaks one-transaction-per-migration;
    `sqlite3.complete_statement` keeps trigger bodies and quoted semicolons intact.
    """
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
