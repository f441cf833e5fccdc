-- Records name their host, publisher and machine type by a small integer from `names` instead of
-- repeating the 52-character base58 key or 64-character hex digest in every row and in three
-- indexes. A row and its index entries shrink from ~570 to ~200 bytes, and so does what every
-- group commit writes to the WAL and every checkpoint writes back (docs/BENCHMARKS.md, "Compact
-- records"). Portable SQL (SQLite and PostgreSQL); existing records keep their values.

-- A key's text (base58 of a host's or publisher's key, hex of a machine type's digest) once.
-- Ids given at ingest are derived from the text (store.rs, `name_id`), at or above 2^62; the ids
-- given here to names already recorded are their rank, below it, so the two never meet.
CREATE TABLE names (
    id    BIGINT PRIMARY KEY,
    name  TEXT NOT NULL UNIQUE
);

INSERT INTO names (id, name)
SELECT ROW_NUMBER() OVER (ORDER BY name), name FROM (
    SELECT host AS name FROM records
    UNION SELECT publisher FROM records
    UNION SELECT machine_type FROM records
) AS recorded;

CREATE TABLE records_compact (
    record_id    TEXT PRIMARY KEY,
    host         BIGINT NOT NULL REFERENCES names(id),
    publisher    BIGINT NOT NULL,
    machine_type BIGINT NOT NULL,
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

INSERT INTO records_compact (record_id, host, publisher, machine_type, machine_id, start_s, end_s,
                             cpu_ms, wall_ms, cores, benchmark, outcome, credit, day, received)
SELECT r.record_id, h.id, p.id, t.id, r.machine_id, r.start_s, r.end_s,
       r.cpu_ms, r.wall_ms, r.cores, r.benchmark, r.outcome, r.credit, r.day, r.received
FROM records r
JOIN names h ON h.name = r.host
JOIN names p ON p.name = r.publisher
JOIN names t ON t.name = r.machine_type;

DROP TABLE records;
ALTER TABLE records_compact RENAME TO records;

CREATE INDEX records_host ON records(host);
CREATE INDEX records_day ON records(day);
CREATE INDEX records_publisher ON records(publisher);
CREATE INDEX records_machine_type ON records(machine_type);
