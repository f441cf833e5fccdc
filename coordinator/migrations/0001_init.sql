-- Gleaner coordinator schema, portable SQL (SQLite and PostgreSQL).
CREATE TABLE accounts (
    name        TEXT PRIMARY KEY,
    team        TEXT NOT NULL,
    token_hash  TEXT NOT NULL,
    created     BIGINT NOT NULL
);

CREATE TABLE hosts (
    host        TEXT PRIMARY KEY,
    account     TEXT NOT NULL REFERENCES accounts(name),
    enrolled    BIGINT NOT NULL,
    flagged     INTEGER NOT NULL DEFAULT 0,
    flag_reason TEXT
);

CREATE TABLE machine_types (
    digest       TEXT PRIMARY KEY,
    publisher    TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      BIGINT NOT NULL,
    weight_milli INTEGER NOT NULL
);

CREATE TABLE records (
    record_id    TEXT PRIMARY KEY,
    host         TEXT NOT NULL REFERENCES hosts(host),
    publisher    TEXT NOT NULL,
    machine_type TEXT NOT NULL,
    machine_id   TEXT NOT NULL,
    start_s      BIGINT NOT NULL,
    end_s        BIGINT NOT NULL,
    cpu_ms       BIGINT NOT NULL,
    wall_ms      BIGINT NOT NULL,
    cores        INTEGER NOT NULL,
    benchmark    BIGINT NOT NULL,
    outcome      INTEGER NOT NULL,
    credit       DOUBLE PRECISION NOT NULL,
    day          BIGINT NOT NULL,
    received     BIGINT NOT NULL
);

CREATE INDEX records_host ON records(host);
CREATE INDEX records_day ON records(day);
CREATE INDEX records_publisher ON records(publisher);
