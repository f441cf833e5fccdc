//! Durable storage of accounts, hosts and verified usage records (sqlx): SQLite embedded by default
//! (WAL, synchronous=FULL) or PostgreSQL, chosen by the database URL, with the same migrations and
//! the same SQL for both. Ingest goes through one writer task that commits the batches of concurrent
//! requests in one transaction (group commit) and answers each request only after that commit.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gleaner::credit::credit;
use gleaner::{PublicKey, UsageRecord};
use serde::Serialize;
use sha2::Digest as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database URL must start with sqlite: or postgres:, not {0:?}")]
    Scheme(String),
    #[error("the ingest writer has stopped")]
    WriterGone,
    #[error("another writer stored some of the same records concurrently")]
    Raced,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Accepted,
    Duplicate,
    Rejected { reason: String },
    Retry { reason: String },
}

/// Which database engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The two pools; every query is written once and runs on either (see `with_pool!`).
#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Expands `$body` (written like a closure so that rustfmt formats it; it is not one: `?` and
/// `.await` act on the enclosing function) once per backend with `$p` bound to that backend's pool,
/// so the same SQL text and the same row decoding serve both (`$1`-style placeholders work on SQLite
/// and PostgreSQL). `$begin` is the statement that opens a write transaction: SQLite takes the write
/// lock up front so that a read-then-write transaction never fails on a lock upgrade.
macro_rules! with_pool {
    ($pool:expr, |$p:ident, $begin:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => {
                let $begin = "BEGIN IMMEDIATE";
                $body
            }
            Pool::Postgres($p) => {
                let $begin = "BEGIN";
                $body
            }
        }
    };
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// Records per multi-row INSERT: 15 parameters each stays under SQLite's 32766 and PostgreSQL's
/// 65535 bound parameters.
const INSERT_CHUNK: usize = 1000;
/// A group commit stops taking queued batches once it holds this many records.
const GROUP_MAX_RECORDS: usize = 20_000;
/// Batches waiting for the writer; senders wait (back-pressure) when it is full.
const WRITER_QUEUE: usize = 256;

struct Job {
    records: Vec<UsageRecord>,
    now: u64,
    /// When the request handed the batch to the writers (for [`IngestTiming::queued`]).
    queued: Instant,
    reply: oneshot::Sender<Result<Stored, StoreError>>,
}

/// A batch's outcomes and how long the store took over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// One per record, in order.
    pub outcomes: Vec<Outcome>,
    pub timing: IngestTiming,
}

/// Where a batch's time in the store went (reported in the ingest answer's `Server-Timing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestTiming {
    /// From handing the batch over until a writer took it into a group: the queue, and a commit
    /// in flight on every writer.
    pub queued: Duration,
    /// Its group's transaction, begin to durable commit (with a one-by-one retry, that one).
    pub commit: Duration,
}

/// The coordinator's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    writer: mpsc::Sender<Job>,
    groups: Arc<GroupCounters>,
}

/// Group-commit counters as read by [`Store::group_commits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    pub commits: u64,
    pub batches: u64,
    pub busy: Duration,
}

/// How well group commit is grouping: transactions committed and the batches they held.
#[derive(Debug, Default)]
struct GroupCounters {
    commits: AtomicU64,
    batches: AtomicU64,
    /// Time spent in successful group transactions, begin to durable commit.
    micros: AtomicU64,
}

fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// One row of a leaderboard.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row2 {
    /// What is shown: account, team, host or project name.
    pub key: String,
    /// What the row links to (the same as `key` except for projects, where it is the publisher).
    pub id: String,
    pub credit: f64,
    pub cpu_hours: f64,
    pub records: i64,
    /// Recent average credit per day (BOINC's RAC), decayed to now.
    pub rac: f64,
}

/// Everything the dashboard shows.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    pub total_credit: f64,
    pub total_cpu_hours: f64,
    pub records: i64,
    pub hosts: i64,
    pub volunteers: Vec<Row2>,
    pub teams: Vec<Row2>,
    pub hosts_board: Vec<Row2>,
    pub projects: Vec<Row2>,
    /// (unix day, credit) for the days with credit.
    pub per_day: Vec<(i64, f64)>,
}

/// One machine type of a project, with the credit earned on it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProjectMachineType {
    pub digest: String,
    /// None when records name a machine type the coordinator was never shown.
    pub name: Option<String>,
    pub credit: f64,
    pub records: i64,
}

/// A project's history: a publisher key, or one machine type by its digest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProjectHistory {
    pub id: String,
    /// The publisher's (first) machine type name, or the machine type's name.
    pub name: String,
    pub credit: f64,
    pub cpu_hours: f64,
    pub records: i64,
    pub hosts: i64,
    pub machine_types: Vec<ProjectMachineType>,
    /// (unix day, credit) for the days with credit.
    pub per_day: Vec<(i64, f64)>,
}

/// One host's credit as the coordinator counts it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostHistory {
    pub id: String,
    /// The volunteer account it is enrolled with.
    pub account: Option<String>,
    pub credit: f64,
    pub cpu_hours: f64,
    pub records: i64,
    /// (unix day, credit) for the days with credit.
    pub per_day: Vec<(i64, f64)>,
}

impl Store {
    /// Opens the database at `url` and applies the migrations: `sqlite://path` (created if
    /// missing) or `sqlite::memory:`, or `postgres://user@host:port/db` (the database must exist).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                // Index pages from memory rather than a read() per page miss: the records table
                // has five B-trees that every ingested record touches.
                .pragma("cache_size", "-65536")
                .pragma("mmap_size", "268435456");
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations").run(&pool).await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(StoreError::Scheme(scheme.to_owned()));
        };
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let groups = Arc::new(GroupCounters::default());
        // One writer per store. SQLite has one writer at a time anyway. On PostgreSQL, three
        // overlapping writers deadlocked when two groups held the same record ids (a ledger
        // re-sending a batch) and a batch alone in its group got a 503 (CI caught it in
        // `ingest.rs`'s concurrency test): more writers need one global insert order and a retry
        // on deadlock first.
        tokio::spawn(writer(pool.clone(), rx, groups.clone()));
        Ok(Store {
            pool,
            writer: tx,
            groups,
        })
    }

    /// Ingest transactions committed so far, the batches they held (batches / commits is the
    /// average group size) and the time they took, begin to durable commit.
    pub fn group_commits(&self) -> GroupStats {
        GroupStats {
            commits: self.groups.commits.load(Ordering::Relaxed),
            batches: self.groups.batches.load(Ordering::Relaxed),
            busy: Duration::from_micros(self.groups.micros.load(Ordering::Relaxed)),
        }
    }

    /// The engine behind this store.
    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Creates an account; returns false if it exists.
    pub async fn add_account(
        &self,
        name: &str,
        team: &str,
        token: &str,
        now: u64,
    ) -> Result<bool, StoreError> {
        let sql = "INSERT INTO accounts (name, team, token_hash, created) VALUES ($1, $2, $3, $4) \
                   ON CONFLICT DO NOTHING";
        let n = with_pool!(&self.pool, |p| sqlx::query(sql)
            .bind(name)
            .bind(team)
            .bind(token_hash(token))
            .bind(now as i64)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// Whether `token` is the account's enrolment token.
    pub async fn check_token(&self, account: &str, token: &str) -> Result<bool, StoreError> {
        let hash: Option<String> = with_pool!(&self.pool, |p| sqlx::query(
            "SELECT token_hash FROM accounts WHERE name = $1"
        )
        .bind(account)
        .fetch_optional(p)
        .await?
        .map(|r| r.get::<String, _>(0)));
        Ok(hash.is_some_and(|h| h == token_hash(token)))
    }

    /// Links a host to an account (re-enrolling moves it).
    pub async fn enrol(&self, host: &PublicKey, account: &str, now: u64) -> Result<(), StoreError> {
        with_pool!(&self.pool, |p| sqlx::query(
            "INSERT INTO hosts (host, account, enrolled) VALUES ($1, $2, $3) \
             ON CONFLICT (host) DO UPDATE SET account = excluded.account",
        )
        .bind(host.to_string())
        .bind(account)
        .bind(now as i64)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Registers a machine type's name and weight (from a verified signed definition).
    pub async fn add_machine_type(
        &self,
        digest: &str,
        mt: &gleaner::MachineType,
    ) -> Result<(), StoreError> {
        with_pool!(&self.pool, |p| sqlx::query(
            "INSERT INTO machine_types (digest, publisher, name, version, weight_milli) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(digest)
        .bind(mt.publisher.to_string())
        .bind(&mt.name)
        .bind(mt.version as i64)
        .bind(i64::from(mt.weight_milli))
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Stores verified records and returns one outcome per record, only after the transaction that
    /// holds them is durably committed. Concurrent calls share one transaction (group commit); each
    /// call's records are all in it or all out of it.
    pub async fn ingest(
        &self,
        records: Vec<UsageRecord>,
        now: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        Ok(self.ingest_timed(records, now).await?.outcomes)
    }

    /// As [`Store::ingest`], also saying how long the batch waited for a writer and how long its
    /// group's commit took.
    pub async fn ingest_timed(
        &self,
        records: Vec<UsageRecord>,
        now: u64,
    ) -> Result<Stored, StoreError> {
        if records.is_empty() {
            return Ok(Stored {
                outcomes: Vec::new(),
                timing: IngestTiming::default(),
            });
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Job {
                records,
                now,
                queued: Instant::now(),
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    async fn board(&self, key: &'static str, join: &'static str) -> Result<Vec<Row2>, StoreError> {
        let mut rows = self.board_totals(key, join).await?;
        // RAC from each row's credit per end time, in time order (the formula decays between adds).
        let sql =
            format!("SELECT {key} AS k, r.end_s, r.credit FROM records r {join} ORDER BY r.end_s");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut rac: HashMap<String, gleaner::credit::Rac> = Default::default();
        // `key` and `join` are fixed strings from this file, never client input.
        with_pool!(&self.pool, |p| {
            for row in sqlx::query(AssertSqlSafe(sql)).fetch_all(p).await? {
                let k: String = row.get(0);
                let r = rac.entry(k).or_default();
                *r = r.add(row.get::<f64, _>(2), row.get::<i64, _>(1).max(0) as u64);
            }
        });
        for row in &mut rows {
            row.rac = rac.get(&row.id).map(|r| r.at(now).value).unwrap_or(0.0);
        }
        Ok(rows)
    }

    async fn board_totals(
        &self,
        key: &'static str,
        join: &'static str,
    ) -> Result<Vec<Row2>, StoreError> {
        // PostgreSQL sums BIGINT as NUMERIC: cast back so both engines return a 64-bit integer.
        // Ties are broken by key so both engines list rows in the same order.
        let sql = format!(
            "SELECT {key} AS k, SUM(r.credit), CAST(SUM(r.cpu_ms) AS BIGINT), COUNT(*) FROM records r {join} \
             GROUP BY {key} ORDER BY SUM(r.credit) DESC, k LIMIT 50"
        );
        // `key` and `join` are fixed strings from this file, never client input.
        Ok(with_pool!(&self.pool, |p| sqlx::query(AssertSqlSafe(sql))
            .fetch_all(p)
            .await?
            .iter()
            .map(|row| {
                let key = row.get::<String, _>(0);
                Row2 {
                    id: key.clone(),
                    key,
                    credit: row.get::<f64, _>(1),
                    cpu_hours: row.get::<i64, _>(2) as f64 / 3_600_000.0,
                    records: row.get::<i64, _>(3),
                    rac: 0.0,
                }
            })
            .collect()))
    }

    /// The first machine-type name of each publisher, for showing projects by name.
    async fn publisher_names(&self) -> Result<HashMap<String, String>, StoreError> {
        Ok(with_pool!(&self.pool, |p| sqlx::query(
            "SELECT publisher, MIN(name) FROM machine_types GROUP BY publisher"
        )
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect()))
    }

    /// The registered name of each machine type, by digest (for showing what runs in the space).
    pub async fn machine_type_names(&self) -> Result<HashMap<String, String>, StoreError> {
        Ok(with_pool!(&self.pool, |p| sqlx::query(
            "SELECT digest, name FROM machine_types"
        )
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect()))
    }

    /// Totals, leaderboards and credit per day.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let sql = "SELECT COALESCE(SUM(credit), 0.0), CAST(COALESCE(SUM(cpu_ms), 0) AS BIGINT), \
                   COUNT(*) FROM records";
        let (total_credit, cpu_ms, records) = with_pool!(&self.pool, |p| {
            let t = sqlx::query(sql).fetch_one(p).await?;
            (t.get::<f64, _>(0), t.get::<i64, _>(1), t.get::<i64, _>(2))
        });
        let hosts: i64 = with_pool!(&self.pool, |p| sqlx::query("SELECT COUNT(*) FROM hosts")
            .fetch_one(p)
            .await?
            .get(0));
        let per_day = with_pool!(&self.pool, |p| sqlx::query(
            "SELECT day, SUM(credit) FROM records GROUP BY day ORDER BY day"
        )
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<f64, _>(1)))
        .collect());
        let names = self.publisher_names().await?;
        let mut projects = self.board("r.publisher", "").await?;
        for row in &mut projects {
            if let Some(name) = names.get(&row.id) {
                row.key = name.clone();
            }
        }
        Ok(Stats {
            total_credit,
            total_cpu_hours: cpu_ms as f64 / 3_600_000.0,
            records,
            hosts,
            volunteers: self
                .board("h.account", "JOIN hosts h ON h.host = r.host")
                .await?,
            teams: self
                .board(
                    "a.team",
                    "JOIN hosts h ON h.host = r.host JOIN accounts a ON a.name = h.account",
                )
                .await?,
            hosts_board: self.board("r.host", "").await?,
            projects,
            per_day,
        })
    }

    /// Credit per day of one host.
    pub async fn host_days(&self, host: &str) -> Result<Vec<(i64, f64)>, StoreError> {
        Ok(with_pool!(&self.pool, |p| sqlx::query(
            "SELECT day, SUM(credit) FROM records WHERE host = $1 GROUP BY day ORDER BY day",
        )
        .bind(host)
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<f64, _>(1)))
        .collect()))
    }

    /// One host's credit (what `gleaner credit` shows as the coordinator's view): None when the
    /// coordinator knows neither records from it nor its enrolment.
    pub async fn host(&self, host: &str) -> Result<Option<HostHistory>, StoreError> {
        let per_day = self.host_days(host).await?;
        let (cpu_ms, records) = with_pool!(&self.pool, |p| {
            let r = sqlx::query(
                "SELECT CAST(COALESCE(SUM(cpu_ms), 0) AS BIGINT), COUNT(*) FROM records \
                 WHERE host = $1",
            )
            .bind(host)
            .fetch_one(p)
            .await?;
            (r.get::<i64, _>(0), r.get::<i64, _>(1))
        });
        let account: Option<String> = with_pool!(&self.pool, |p| sqlx::query(
            "SELECT account FROM hosts WHERE host = $1"
        )
        .bind(host)
        .fetch_optional(p)
        .await?
        .map(|r| r.get::<String, _>(0)));
        if records == 0 && account.is_none() {
            return Ok(None);
        }
        Ok(Some(HostHistory {
            id: host.to_owned(),
            account,
            credit: per_day.iter().map(|(_, c)| c).sum(),
            cpu_hours: cpu_ms as f64 / 3_600_000.0,
            records,
            per_day,
        }))
    }

    /// The history of a project: `id` is a publisher key or a machine type's digest. None when
    /// the coordinator knows neither records nor machine types for it.
    pub async fn project(&self, id: &str) -> Result<Option<ProjectHistory>, StoreError> {
        let (per_day, cpu_ms, records) = with_pool!(&self.pool, |p| {
            let mut per_day = Vec::new();
            let (mut cpu_ms, mut records) = (0i64, 0i64);
            for r in sqlx::query(
                "SELECT day, SUM(credit), CAST(SUM(cpu_ms) AS BIGINT), COUNT(*) FROM records \
             WHERE publisher = $1 OR machine_type = $1 GROUP BY day ORDER BY day",
            )
            .bind(id)
            .fetch_all(p)
            .await?
            {
                per_day.push((r.get::<i64, _>(0), r.get::<f64, _>(1)));
                cpu_ms += r.get::<i64, _>(2);
                records += r.get::<i64, _>(3);
            }
            (per_day, cpu_ms, records)
        });
        let sql =
            "SELECT COUNT(DISTINCT host) FROM records WHERE publisher = $1 OR machine_type = $1";
        let hosts: i64 = with_pool!(&self.pool, |p| sqlx::query(sql)
            .bind(id)
            .fetch_one(p)
            .await?
            .get(0));
        // Machine types with credit, then those registered but not (yet) run.
        let mut machine_types: Vec<ProjectMachineType> = with_pool!(&self.pool, |p| sqlx::query(
            "SELECT r.machine_type, MIN(m.name), SUM(r.credit), COUNT(*) FROM records r \
             LEFT JOIN machine_types m ON m.digest = r.machine_type \
             WHERE r.publisher = $1 OR r.machine_type = $1 \
             GROUP BY r.machine_type ORDER BY SUM(r.credit) DESC, r.machine_type",
        )
        .bind(id)
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| ProjectMachineType {
            digest: r.get(0),
            name: r.get(1),
            credit: r.get(2),
            records: r.get(3),
        })
        .collect());
        let known: Vec<(String, String)> = with_pool!(&self.pool, |p| sqlx::query(
            "SELECT digest, name FROM machine_types WHERE publisher = $1 OR digest = $1 \
             ORDER BY name, digest",
        )
        .bind(id)
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect());
        if records == 0 && known.is_empty() {
            return Ok(None);
        }
        for (digest, name) in &known {
            if !machine_types.iter().any(|m| &m.digest == digest) {
                machine_types.push(ProjectMachineType {
                    digest: digest.clone(),
                    name: Some(name.clone()),
                    credit: 0.0,
                    records: 0,
                });
            }
        }
        let name = known
            .iter()
            .map(|k| k.1.clone())
            .min()
            .unwrap_or_else(|| id.to_owned());
        Ok(Some(ProjectHistory {
            id: id.to_owned(),
            name,
            credit: per_day.iter().map(|d| d.1).sum(),
            cpu_hours: cpu_ms as f64 / 3_600_000.0,
            records,
            hosts,
            machine_types,
            per_day,
        }))
    }
}

/// The group-commit writer: takes every batch queued while it committed and commits them together.
/// If a group fails, each batch is retried alone so that one cannot sink the others.
async fn writer(pool: Pool, mut rx: mpsc::Receiver<Job>, groups: Arc<GroupCounters>) {
    loop {
        let mut jobs = {
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut n = first.records.len();
            let mut jobs = vec![first];
            while n < GROUP_MAX_RECORDS {
                match rx.try_recv() {
                    Ok(j) => {
                        n += j.records.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            jobs
        };
        let started = Instant::now();
        let timing = |job: &Job, commit: Duration| IngestTiming {
            queued: started.saturating_duration_since(job.queued),
            commit,
        };
        match commit_group(&pool, &jobs).await {
            Ok(outs) => {
                let took = started.elapsed();
                groups.commits.fetch_add(1, Ordering::Relaxed);
                groups
                    .micros
                    .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                groups
                    .batches
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                for (job, outcomes) in jobs.into_iter().zip(outs) {
                    let timing = timing(&job, took);
                    let _ = job.reply.send(Ok(Stored { outcomes, timing }));
                }
            }
            Err(e) if jobs.len() == 1 => {
                if let Some(job) = jobs.pop() {
                    let _ = job.reply.send(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(
                    "group commit of {} batches failed ({e}); one by one",
                    jobs.len()
                );
                for job in jobs {
                    let alone = Instant::now();
                    let r = commit_group(&pool, std::slice::from_ref(&job))
                        .await
                        .map(|mut o| Stored {
                            outcomes: o.pop().unwrap_or_default(),
                            timing: timing(&job, alone.elapsed()),
                        });
                    let _ = job.reply.send(r);
                }
            }
        }
    }
}

/// A record that passed the checks and goes to the INSERT, with where its answer belongs.
struct Pending<'a> {
    job: usize,
    pos: usize,
    id: String,
    host: String,
    publisher: String,
    machine_type: String,
    record: &'a UsageRecord,
    credit: f64,
}

/// `n` placeholders separated by commas starting at `$first`. SQLite gets anonymous `?`: it looks
/// each named or numbered one (`$N`, `?N`) up in a list while parsing, which is quadratic in their
/// count and took seconds for 15 000 parameters; PostgreSQL needs `$N`.
fn placeholders(sql: &mut String, first: usize, n: usize, numbered: bool) {
    for c in 0..n {
        if c > 0 {
            sql.push(',');
        }
        if numbered {
            sql.push('$');
            sql.push_str(&(first + c).to_string());
        } else {
            sql.push('?');
        }
    }
}

/// The query for which of `n` record ids are stored already.
fn existing_sql(n: usize, numbered: bool) -> String {
    let mut sql = String::from("SELECT record_id FROM records WHERE record_id IN (");
    placeholders(&mut sql, 1, n, numbered);
    sql.push(')');
    sql
}

/// The multi-row INSERT for `rows` records. No RETURNING: sqlx hands each returned row across a
/// channel from SQLite's worker thread, which cost more than the insert itself.
fn insert_sql(rows: usize, numbered: bool) -> String {
    let mut sql = String::from(
        "INSERT INTO records (record_id, host, publisher, machine_type, machine_id, start_s, end_s, \
         cpu_ms, wall_ms, cores, benchmark, outcome, credit, day, received) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        placeholders(&mut sql, i * 15 + 1, 15, numbered);
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

/// Checks, prices and inserts the records of `jobs` in one transaction; one outcome list per job.
async fn commit_group(pool: &Pool, jobs: &[Job]) -> Result<Vec<Vec<Outcome>>, StoreError> {
    let numbered = matches!(pool, Pool::Postgres(_));
    with_pool!(pool, |p, begin| {
        let mut tx = p.begin_with(begin).await?;
        let mut out: Vec<Vec<Outcome>> = jobs
            .iter()
            .map(|j| Vec::with_capacity(j.records.len()))
            .collect();
        let mut enrolled: HashMap<String, bool> = HashMap::new();
        let mut weights: HashMap<String, i64> = HashMap::new();
        let mut flagged: HashSet<String> = HashSet::new();
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        let mut pending: Vec<Pending<'_>> = Vec::new();
        // Key text (base58 of the peer id) costs microseconds per key; a group names few keys.
        let mut names: HashMap<PublicKey, String> = HashMap::new();
        for (ji, job) in jobs.iter().enumerate() {
            let now = job.now;
            for r in &job.records {
                let host = names
                    .entry(r.host)
                    .or_insert_with(|| r.host.to_string())
                    .clone();
                let known = match enrolled.get(&host) {
                    Some(k) => *k,
                    None => {
                        let k = sqlx::query("SELECT 1 FROM hosts WHERE host = $1")
                            .bind(&host)
                            .fetch_optional(&mut *tx)
                            .await?
                            .is_some();
                        enrolled.insert(host.clone(), k);
                        k
                    }
                };
                if !known {
                    out[ji].push(Outcome::Retry {
                        reason: format!("host {host} is not enrolled"),
                    });
                    continue;
                }
                if r.end > now + 300 {
                    out[ji].push(Outcome::Rejected {
                        reason: format!("ends at {} which is in the future (now {now})", r.end),
                    });
                    continue;
                }
                if r.wall_ms > 31 * 86_400_000 {
                    out[ji].push(Outcome::Rejected {
                        reason: "a single record cannot cover more than 31 days".into(),
                    });
                    continue;
                }
                let mt = r.machine_type.to_string();
                let weight = match weights.get(&mt) {
                    Some(w) => *w,
                    None => {
                        let w = sqlx::query(
                            "SELECT CAST(weight_milli AS BIGINT) FROM machine_types WHERE digest = $1",
                        )
                        .bind(&mt)
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|row| row.get::<i64, _>(0))
                        .unwrap_or(1000);
                        weights.insert(mt.clone(), w);
                        w
                    }
                };
                let c = credit(r, weight.clamp(1, 100_000) as u32);
                if c.scale_clamped && flagged.insert(host.clone()) {
                    sqlx::query("UPDATE hosts SET flagged = 1, flag_reason = $1 WHERE host = $2")
                        .bind(format!(
                            "benchmark {} outside the allowed scale",
                            r.benchmark
                        ))
                        .bind(&host)
                        .execute(&mut *tx)
                        .await?;
                }
                if !seen.insert(r.record_id.0) {
                    // The same record twice in this group: the first occurrence decides.
                    out[ji].push(Outcome::Duplicate);
                    continue;
                }
                let publisher = names
                    .entry(r.publisher)
                    .or_insert_with(|| r.publisher.to_string())
                    .clone();
                pending.push(Pending {
                    job: ji,
                    pos: out[ji].len(),
                    id: r.record_id.to_string(),
                    host,
                    publisher,
                    machine_type: mt,
                    record: r,
                    credit: c.credit,
                });
                out[ji].push(Outcome::Accepted);
            }
        }
        for chunk in pending.chunks(INSERT_CHUNK) {
            // Duplicates are rare (a ledger re-sending after a lost answer): ask which ids exist,
            // usually getting no rows back, and insert the rest.
            let mut q = sqlx::query(AssertSqlSafe(existing_sql(chunk.len(), numbered)));
            for pr in chunk {
                q = q.bind(pr.id.clone());
            }
            let existing: HashSet<String> = q
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| row.get::<String, _>(0))
                .collect();
            let fresh: Vec<&Pending<'_>> = chunk
                .iter()
                .filter(|pr| !existing.contains(&pr.id))
                .collect();
            for pr in chunk.iter().filter(|pr| existing.contains(&pr.id)) {
                out[pr.job][pr.pos] = Outcome::Duplicate;
            }
            if fresh.is_empty() {
                continue;
            }
            let mut q = sqlx::query(AssertSqlSafe(insert_sql(fresh.len(), numbered)));
            for pr in &fresh {
                let r = pr.record;
                q = q
                    .bind(pr.id.clone())
                    .bind(pr.host.clone())
                    .bind(pr.publisher.clone())
                    .bind(pr.machine_type.clone())
                    .bind(r.machine_id.to_string())
                    .bind(r.start as i64)
                    .bind(r.end as i64)
                    .bind(r.cpu_ms as i64)
                    .bind(r.wall_ms as i64)
                    .bind(i64::from(r.cores))
                    .bind(i64::from(r.benchmark))
                    .bind(r.outcome as u8 as i64)
                    .bind(pr.credit)
                    .bind((r.end / 86_400) as i64)
                    .bind(jobs[pr.job].now as i64);
            }
            let inserted = q.execute(&mut *tx).await?.rows_affected();
            if inserted != fresh.len() as u64 {
                // Another writer (a second coordinator on the same PostgreSQL) stored some of
                // these ids since we looked: give up this group; its batches are retried one by
                // one and then see those ids as duplicates.
                return Err(StoreError::Raced);
            }
        }
        tx.commit().await?;
        Ok(out)
    })
}
