//! A database written by an earlier coordinator (records naming hosts, publishers and machine
//! types by their text, migrations 0001–0002) opened by this one: migration 0003 moves the names
//! into `names`, and every record, board, host and project answer stays what it was — and ingest
//! goes on crediting the same host, type and project — on SQLite and on PostgreSQL.

#[path = "support/pg.rs"]
mod pg;

use gleaner::{Digest, Id16, OutcomeCode, SecretKey, UsageRecord};
use gleaner_coordinator::store::{Outcome, Store};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Opens `url` with only the migrations up to 0002 and writes rows as that schema held them:
/// two hosts of one account, one registered machine type (weight 2) and one never registered.
async fn earlier_database(url: &str, hosts: [&SecretKey; 2], publisher: &SecretKey) {
    let day = (now() / 86_400) as i64;
    let mut statements = vec![
        "INSERT INTO accounts (name, team, token_hash, created) VALUES ('alice', 'physics', 'x', 1)"
            .to_string(),
        format!(
            "INSERT INTO hosts (host, account, enrolled) VALUES ('{}', 'alice', 1), ('{}', 'alice', 1)",
            hosts[0].public(),
            hosts[1].public()
        ),
        format!(
            "INSERT INTO machine_types (digest, publisher, name, version, weight_milli) \
             VALUES ('{}', '{}', 'sim', 1, 2000)",
            Digest([1; 32]),
            publisher.public()
        ),
    ];
    // (record id, host, machine type, credit, day)
    let rows = [
        (1u8, 0usize, 1u8, 2.0, day - 1),
        (2, 0, 2, 1.0, day),
        (3, 1, 1, 4.0, day),
    ];
    for (id, host, mt, credit, day) in rows {
        statements.push(format!(
            "INSERT INTO records (record_id, host, publisher, machine_type, machine_id, start_s, \
             end_s, cpu_ms, wall_ms, cores, benchmark, outcome, credit, day, received) VALUES \
             ('{}', '{}', '{}', '{}', '{}', 0, {}, 3600000, 3600000, 1, 1000, 0, {credit:?}, {day}, 1)",
            Id16([id; 16]),
            hosts[host].public(),
            publisher.public(),
            Digest([mt; 32]),
            Id16([id; 16]),
            day * 86_400,
        ));
    }
    macro_rules! write_with {
        ($pool:expr) => {{
            let pool = $pool;
            sqlx::migrate!("./migrations")
                .run_to(2, &pool)
                .await
                .unwrap();
            for sql in statements {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.close().await;
        }};
    }
    if url.starts_with("sqlite:") {
        let opts = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        write_with!(sqlx::SqlitePool::connect_with(opts).await.unwrap());
    } else {
        write_with!(sqlx::PgPool::connect(url).await.unwrap());
    }
}

async fn scenario(url: &str) {
    let (h1, h2) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
    let publisher = SecretKey::from_seed([9; 32]);
    earlier_database(url, [&h1, &h2], &publisher).await;

    let store = Store::open(url).await.unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let s = store.stats().await.unwrap();
    assert_eq!((s.records, s.hosts), (3, 2), "{s:?}");
    assert!(close(s.total_credit, 7.0), "{s:?}");
    let board: Vec<(String, f64, i64)> = s
        .hosts_board
        .iter()
        .map(|r| (r.id.clone(), r.credit, r.records))
        .collect();
    assert_eq!(
        board,
        vec![
            (h2.public().to_string(), 4.0, 1),
            (h1.public().to_string(), 3.0, 2)
        ]
    );
    assert_eq!(s.volunteers.len(), 1);
    assert_eq!(
        (s.volunteers[0].key.as_str(), s.volunteers[0].records),
        ("alice", 3)
    );
    assert_eq!(
        (s.teams[0].key.as_str(), s.teams[0].records),
        ("physics", 3)
    );
    // A project is shown by its machine type's name, found through its publisher's key.
    assert_eq!(s.projects.len(), 1);
    assert_eq!(
        (s.projects[0].key.as_str(), s.projects[0].id.clone()),
        ("sim", publisher.public().to_string())
    );
    assert_eq!(s.per_day.len(), 2, "{s:?}");

    let h = store.host(&h1.public().to_string()).await.unwrap().unwrap();
    assert_eq!((h.records, h.account.as_deref()), (2, Some("alice")));
    assert!(close(h.credit, 3.0));
    let p = store
        .project(&publisher.public().to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((p.records, p.hosts, p.name.as_str()), (3, 2, "sim"));
    let types: Vec<(String, Option<String>, i64)> = p
        .machine_types
        .iter()
        .map(|m| (m.digest.clone(), m.name.clone(), m.records))
        .collect();
    assert_eq!(
        types,
        vec![
            (Digest([1; 32]).to_string(), Some("sim".into()), 2),
            (Digest([2; 32]).to_string(), None, 1),
        ]
    );
    let unregistered = store
        .project(&Digest([2; 32]).to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((unregistered.records, unregistered.hosts), (1, 1));

    // Ingest after the migration credits the names it numbered, not new ones beside them.
    let end = now() - 10;
    let r = UsageRecord {
        v: 1,
        record_id: Id16([7; 16]),
        host: h1.public(),
        machine_id: Id16([7; 16]),
        publisher: publisher.public(),
        machine_type: Digest([1; 32]),
        start: end - 3600,
        end,
        cpu_ms: 3_600_000,
        wall_ms: 3_600_000,
        peak_memory: 1 << 20,
        cores: 1,
        benchmark: 1000,
        outcome: OutcomeCode::Success,
    };
    assert_eq!(
        store.ingest(vec![r.clone()], now()).await.unwrap(),
        vec![Outcome::Accepted]
    );
    assert_eq!(
        store.ingest(vec![r], now()).await.unwrap(),
        vec![Outcome::Duplicate]
    );
    let h = store.host(&h1.public().to_string()).await.unwrap().unwrap();
    assert_eq!(h.records, 3);
    let p = store
        .project(&publisher.public().to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((p.records, p.hosts), (4, 2));
    assert_eq!(p.machine_types[0].records, 3, "{p:?}");
    let s = store.stats().await.unwrap();
    assert_eq!(
        (s.hosts_board.len(), s.projects.len(), s.records),
        (2, 1, 4)
    );
}

#[tokio::test]
async fn an_earlier_sqlite_database_keeps_its_records_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    scenario(&format!("sqlite://{}", dir.path().join("c.db").display())).await;
}

#[tokio::test]
async fn an_earlier_postgres_database_keeps_its_records_and_answers() {
    let Some(cluster) = pg::PgCluster::start_or_skip("migrate") else {
        return;
    };
    scenario(&cluster.create_db("migrate")).await;
}
