//! Durable storage of accounts, hosts and verified usage records (sqlx): SQLite embedded by default
//! (WAL) or PostgreSQL, chosen by the database URL, with the same migrations and the same SQL for
//! both. Ingest goes through a writer task (one on SQLite, [`PG_WRITERS`] sharing the queue on
//! PostgreSQL) that commits the batches of concurrent requests in one transaction (group commit)
//! and answers each request only once that transaction is durable: on PostgreSQL when COMMIT
//! returns; on SQLite when a sync stage has made the write-ahead log durable
//! after the commit (see "Pipelined durability on SQLite" below).
//!
//! # Pipelined durability on SQLite
//!
//! With `synchronous=FULL` every COMMIT writes its WAL frames and then fsyncs the WAL, and the one
//! writer waits for that fsync before it can take the next group: a batch arriving meanwhile waits
//! for that sync and then for its own. Here the writer's own connection runs `synchronous=NORMAL`
//! (COMMIT writes the frames with write() and returns) and hands the group's answers to a sync
//! stage, which opens the `-wal` file by path *after* the commit returned and calls `fdatasync` on
//! it (off the async workers, at most [`SYNCS_IN_FLIGHT`] at once, all groups committed while every
//! slot was busy sharing one sync), and answers the group only when that `fdatasync` has returned.
//! The writer meanwhile commits the next group, whose sync may run beside the previous one.
//! Answers leave in commit order. Why a power loss after an answer cannot lose its records
//! (checked against SQLite 3.51.3, the version bundled by libsqlite3-sys, and its documentation):
//!
//! - A commit under NORMAL has written all its frames, the commit frame last, into the WAL file
//!   with write() before COMMIT returns; the frames and the WAL header are ordinary data of that
//!   file. `fdatasync` is per inode, so one started after COMMIT returned, through any descriptor
//!   of the same file, makes them durable together with every earlier frame (recovery needs the
//!   earlier frames too: frame checksums are cumulative). D. R. Hipp on the SQLite forum: one
//!   fsync of the WAL "makes all prior transactions durable across power failures or OS crashes",
//!   whichever connection committed them; the forum's conclusion names syncing the WAL file as
//!   the cheap way to make NORMAL commits durable.
//! - The file is opened again for every sync because the WAL can be deleted (when the last
//!   connection closes) and created anew. A deleted WAL was checkpointed first with its
//!   database synced (`sqlite3WalClose`); a newly created one has its directory entry synced by
//!   SQLite itself at its first header sync (`UNIXFILE_DIRSYNC`), which happens before the first
//!   commit into it returns, under NORMAL too (`syncHeader`, `CKPT_SYNC_FLAGS`).
//! - Checkpoints (run by the checkpoint stage, below) sync the WAL before copying frames into the
//!   database, so whatever they copy is durable in the WAL first, acknowledged or not yet
//!   (sqlite.org/pragma.html#pragma_synchronous; `walCheckpoint`). They sync the database after
//!   copying when they copied every frame, and only a checkpoint that did so can make the
//!   backfilled count reach the WAL's end. The WAL is restarted (overwritten from the start under
//!   a new salt, the new header synced before the first commit into it returns) or truncated only
//!   when every frame is backfilled (`walRestartLog`, `walCheckpoint`), i.e. after the database
//!   holding them was synced. So no acknowledged frame leaves the WAL before it is durable in the
//!   database.
//! - The `-shm` wal-index is not needed for recovery: the first connection after a crash
//!   truncates it and rebuilds it by reading the WAL (`unixLockSharedMemory`, `walIndexRecover`).
//! - SQLite assumes power-safe overwrite (its default, `SQLITE_POWERSAFE_OVERWRITE=1`), under
//!   FULL as well: a later commit appending into the sector after a synced commit frame does not
//!   damage it, so NORMAL needs no sector padding.
//!
//! # Checkpoints
//!
//! No connection checkpoints inside COMMIT (`wal_autocheckpoint = 0`; by default the COMMIT that
//! takes the WAL past 1000 pages copies it into the database and syncs both, and every batch
//! queued behind that group waits). A checkpoint stage does it beside the writer on its own
//! connection (SQLite's documented pattern: under NORMAL the checkpoint is the only operation
//! that syncs, so a checkpoint in another thread keeps syncs off the writer, wal.html):
//!
//! - After WAL syncs, at most every [`CHECKPOINT_EVERY`], a PASSIVE checkpoint: it never waits
//!   for the writer or readers and copies what it can (under load the writer keeps appending, so
//!   it rarely reaches the end of the WAL and SQLite then skips the database sync); the stage
//!   then `fdatasync`s the database itself, so that the pages copied so far are on disk.
//! - The WAL restarts only after a checkpoint reached its end with no commit since, which a
//!   writer that commits every few milliseconds never allows: without help it grows without
//!   bound. So when a PASSIVE checkpoint finds [`WAL_RESTART_BYTES`] of WAL, the stage takes the
//!   gate that the writer holds while it commits a group and runs a RESTART checkpoint: the tail
//!   since that PASSIVE copied, WAL and database synced (only the tail's pages are dirty), the
//!   next commit writing the WAL again from its start, in place. Batches arriving meanwhile wait
//!   in the queue for that one checkpoint (a few ms), once per [`WAL_RESTART_BYTES`] of WAL,
//!   rather than once per 1000 pages inside a COMMIT. When no WAL sync came for
//!   [`WAL_IDLE_TRUNCATE`] (the writer is idle) it runs a TRUNCATE checkpoint the same way, which
//!   also gives the file's space back (under load it held the writer ~30 ms: freeing and then
//!   reallocating the file). The stage's connection has no busy timeout: a reader still using
//!   the WAL makes RESTART or TRUNCATE report busy (it has still copied and synced), and it is
//!   tried again later, never waited for while the writer is held. So the WAL file stays under
//!   [`WAL_RESTART_BYTES`] plus what the writer appends between two PASSIVE checkpoints.
//! - A restarted or truncated WAL is safe across power loss: everything in it was copied and the
//!   database synced first, so if the truncation is lost the old WAL's frames only rewrite the
//!   pages they already gave the database; the next commit writes and syncs a new header (new
//!   salt) before its frames (`walFrames`, `syncHeader`), after which old frames beyond it fail
//!   the salt check and are ignored.
//! - A failed checkpoint or database sync stops the store like a failed WAL sync (below): after
//!   a failed `fsync` Linux may have dropped the dirty pages, and a later successful sync would
//!   let a checkpoint declare them backfilled and restart the WAL over their only copy.
//!
//! Every other write (accounts, enrolment, machine types) goes through the pool, whose
//! connections keep `synchronous=FULL`. A failed sync stops the store acknowledging anything
//! (like PostgreSQL's PANIC on a failed fsync: after one, Linux may have dropped the dirty pages
//! and a later sync can succeed without them); a restart recovers from what is on disk. Syncs
//! are opened in commit order and answered in that order, so a sync that succeeds is never
//! answered before an earlier one that failed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;

use gleaner::credit::credit;
use gleaner::{Digest, PublicKey, UsageRecord};
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
    #[error("making the write-ahead log {path} durable failed: {reason}")]
    Sync { path: String, reason: String },
    #[error(
        "the store stopped acknowledging after syncing the write-ahead log {path} failed \
         ({reason}); restart the coordinator so that recovery reads what is on disk"
    )]
    Stopped { path: String, reason: String },
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

/// The id in `names` of the text bound as `$1` (NULL, matching no record, if it has none): records
/// name hosts, publishers and machine types by these ids (migration 0003).
macro_rules! name_id_of {
    () => {
        "(SELECT id FROM names WHERE name = $1)"
    };
}

/// Records per multi-row INSERT: 15 parameters each stays under SQLite's 32766 and PostgreSQL's
/// 65535 bound parameters.
const INSERT_CHUNK: usize = 1000;
/// A group commit stops taking queued batches once it holds this many records.
const GROUP_MAX_RECORDS: usize = 20_000;
/// Batches waiting for the writer; senders wait (back-pressure) when it is full.
const WRITER_QUEUE: usize = 256;
/// WAL syncs running at once on SQLite; groups committed while all run share the next one.
pub const SYNCS_IN_FLIGHT: usize = 4;
/// Committed groups waiting for the sync stage; the writer waits when it is full.
const SYNC_QUEUE: usize = 64;
/// The checkpoint stage runs a PASSIVE checkpoint at most this often (after a WAL sync). Each
/// group rewrites the same hot index pages, so a checkpoint a second copies each of them once
/// rather than ten times (every 100 ms, the copies and the database syncs slowed the WAL syncs:
/// p99 4.8 → 7.2 ms at 25 % load).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// A WAL this long is restarted: the writer waits between two groups while the tail is
/// checkpointed. 256 MiB is 65 000 frames of 4 KiB pages; at 25 % of the ingest bench's capacity
/// (30 MB of WAL per second) that is one restart every 8 s.
pub const WAL_RESTART_BYTES: u64 = 256 << 20;
/// With no WAL sync for this long the writer is idle: the WAL is checkpointed and truncated.
pub const WAL_IDLE_TRUNCATE: Duration = Duration::from_millis(500);

/// Group-commit writers on PostgreSQL (each holds a pooled connection while it commits).
pub const PG_WRITERS: usize = 3;
/// Times a group is run again after a deadlock or a race with another writer.
const GROUP_RETRIES: usize = 3;

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
    /// Its group's transaction, begin to COMMIT returned (with a one-by-one retry, that one).
    /// Durable on PostgreSQL; on SQLite the frames are written but not yet synced.
    pub commit: Duration,
    /// SQLite: from the commit's return to the end of the WAL `fdatasync` that made it durable
    /// (waiting for a sync slot and for earlier groups' answers included). Zero on PostgreSQL.
    pub sync: Duration,
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
    /// SQLite's WAL syncs (each covers one or more groups) and their time in `fdatasync`.
    pub syncs: u64,
    pub sync_busy: Duration,
    /// SQLite's checkpoints by the checkpoint stage: passive ones beside the writer, and the WAL
    /// restarts (truncations) for which the writer waited between groups, with that time.
    pub checkpoints: u64,
    pub restarts: u64,
    pub restart_busy: Duration,
    /// The longest WAL a checkpoint found, in frames (pages).
    pub wal_frames_max: u64,
}

/// When the checkpoint stage checkpoints (the constants; tests make them small).
#[derive(Debug, Clone, Copy)]
struct Checkpoints {
    every: Duration,
    restart_bytes: u64,
    idle: Duration,
}

impl Default for Checkpoints {
    fn default() -> Checkpoints {
        Checkpoints {
            every: CHECKPOINT_EVERY,
            restart_bytes: WAL_RESTART_BYTES,
            idle: WAL_IDLE_TRUNCATE,
        }
    }
}

/// How well group commit is grouping: transactions committed and the batches they held.
#[derive(Debug, Default)]
struct GroupCounters {
    commits: AtomicU64,
    batches: AtomicU64,
    /// Time spent in successful group transactions, begin to COMMIT returned.
    micros: AtomicU64,
    syncs: AtomicU64,
    sync_micros: AtomicU64,
    checkpoints: AtomicU64,
    restarts: AtomicU64,
    restart_micros: AtomicU64,
    wal_frames_max: AtomicU64,
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
        Store::open_with(url, Arc::new(Fdatasync), Checkpoints::default()).await
    }

    /// As [`Store::open`], with SQLite's WAL made durable by `durability` (tests hold it back)
    /// and checkpointed as `checkpoints` says.
    async fn open_with<D: WalSync>(
        url: &str,
        durability: Arc<D>,
        checkpoints: Checkpoints,
    ) -> Result<Store, StoreError> {
        let groups = Arc::new(GroupCounters::default());
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                // No checkpoint inside any COMMIT: the checkpoint stage runs them beside the
                // writer (module docs, "Checkpoints"). Left on, a pool connection's commit would
                // also contend with that stage for the checkpoint lock.
                .pragma("wal_autocheckpoint", "0")
                // Index pages from memory rather than a read() per page miss: the records table
                // has five B-trees that every ingested record touches.
                .pragma("cache_size", "-65536")
                .pragma("mmap_size", "268435456");
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts.clone())
                .await?;
            sqlx::migrate!("./migrations").run(&pool).await?;
            // The writer's own connection commits without syncing; the sync stage makes its
            // commits durable (module docs). An in-memory database has no file to sync.
            let file: String =
                sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
                    .fetch_optional(&pool)
                    .await?
                    .map(|r| r.get(0))
                    .unwrap_or_default();
            if file.is_empty() {
                let rx = Arc::new(tokio::sync::Mutex::new(rx));
                tokio::spawn(writer(Pool::Sqlite(pool.clone()), rx, groups.clone(), None));
            } else {
                let one = || {
                    SqlitePoolOptions::new()
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None)
                };
                let ingest = one()
                    .connect_with(opts.clone().synchronous(SqliteSynchronous::Normal))
                    .await?;
                // The checkpointer's own connection: its checkpoints sync the WAL before copying
                // and the database after (synchronous is not OFF); it never waits for a lock
                // (a RESTART or TRUNCATE that would wait for a reader reports busy instead).
                let checkpointer = one()
                    .connect_with(opts.busy_timeout(Duration::ZERO))
                    .await?;
                let (sync_tx, sync_rx) = mpsc::channel(SYNC_QUEUE);
                let (nudge_tx, nudge_rx) = mpsc::channel(1);
                let stopped = Arc::new(AtomicBool::new(false));
                let gate = Arc::new(tokio::sync::Mutex::new(()));
                let wal = PathBuf::from(format!("{file}-wal"));
                tokio::spawn(sync_stage(
                    durability,
                    wal.clone(),
                    sync_rx,
                    groups.clone(),
                    stopped.clone(),
                    nudge_tx,
                ));
                tokio::spawn(checkpoint_stage(
                    checkpointer,
                    PathBuf::from(&file),
                    gate.clone(),
                    nudge_rx,
                    stopped.clone(),
                    groups.clone(),
                    checkpoints,
                ));
                let sync = SyncStage {
                    tx: sync_tx,
                    stopped,
                    wal,
                    gate,
                };
                // One writer: SQLite has one writer at a time, and the sync stage relies on groups
                // arriving in commit order.
                let rx = Arc::new(tokio::sync::Mutex::new(rx));
                tokio::spawn(writer(Pool::Sqlite(ingest), rx, groups.clone(), Some(sync)));
            }
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations").run(&pool).await?;
            // Several writers, so that one collects and inserts the next group while another
            // waits for its COMMIT (durable here). They share the queue. Groups insert their rows
            // in one global order (by record id) and retry on a deadlock or a race with another
            // writer, so two groups holding the same ids (a ledger re-sending a batch) wait for
            // each other instead of deadlocking a lone batch into a 503.
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..PG_WRITERS {
                tokio::spawn(writer(
                    Pool::Postgres(pool.clone()),
                    rx.clone(),
                    groups.clone(),
                    None,
                ));
            }
            Pool::Postgres(pool)
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(StoreError::Scheme(scheme.to_owned()));
        };
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
            syncs: self.groups.syncs.load(Ordering::Relaxed),
            sync_busy: Duration::from_micros(self.groups.sync_micros.load(Ordering::Relaxed)),
            checkpoints: self.groups.checkpoints.load(Ordering::Relaxed),
            restarts: self.groups.restarts.load(Ordering::Relaxed),
            restart_busy: Duration::from_micros(self.groups.restart_micros.load(Ordering::Relaxed)),
            wal_frames_max: self.groups.wal_frames_max.load(Ordering::Relaxed),
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
        let mut projects = self
            .board("pn.name", "JOIN names pn ON pn.id = r.publisher")
            .await?;
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
                .board(
                    "h.account",
                    "JOIN names hn ON hn.id = r.host JOIN hosts h ON h.host = hn.name",
                )
                .await?,
            teams: self
                .board(
                    "a.team",
                    "JOIN names hn ON hn.id = r.host JOIN hosts h ON h.host = hn.name \
                     JOIN accounts a ON a.name = h.account",
                )
                .await?,
            hosts_board: self
                .board("hn.name", "JOIN names hn ON hn.id = r.host")
                .await?,
            projects,
            per_day,
        })
    }

    /// Credit per day of one host.
    pub async fn host_days(&self, host: &str) -> Result<Vec<(i64, f64)>, StoreError> {
        Ok(with_pool!(&self.pool, |p| sqlx::query(concat!(
            "SELECT day, SUM(credit) FROM records WHERE host = ",
            name_id_of!(),
            " GROUP BY day ORDER BY day"
        ),)
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
            let r = sqlx::query(concat!(
                "SELECT CAST(COALESCE(SUM(cpu_ms), 0) AS BIGINT), COUNT(*) FROM records \
                     WHERE host = ",
                name_id_of!()
            ))
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
            for r in sqlx::query(concat!(
                "SELECT day, SUM(credit), CAST(SUM(cpu_ms) AS BIGINT), COUNT(*) FROM records \
                     WHERE publisher = ",
                name_id_of!(),
                " OR machine_type = ",
                name_id_of!(),
                " GROUP BY day ORDER BY day"
            ))
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
        let sql = concat!(
            "SELECT COUNT(DISTINCT host) FROM records WHERE publisher = ",
            name_id_of!(),
            " OR machine_type = ",
            name_id_of!()
        );
        let hosts: i64 = with_pool!(&self.pool, |p| sqlx::query(sql)
            .bind(id)
            .fetch_one(p)
            .await?
            .get(0));
        // Machine types with credit, then those registered but not (yet) run.
        let mut machine_types: Vec<ProjectMachineType> =
            with_pool!(&self.pool, |p| sqlx::query(concat!(
                "SELECT tn.name, MIN(m.name), SUM(r.credit), COUNT(*) FROM records r \
                 JOIN names tn ON tn.id = r.machine_type \
                 LEFT JOIN machine_types m ON m.digest = tn.name \
                 WHERE r.publisher = ",
                name_id_of!(),
                " OR r.machine_type = ",
                name_id_of!(),
                " GROUP BY tn.name ORDER BY SUM(r.credit) DESC, tn.name"
            ),)
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

/// A batch committed with its outcomes, waiting to be answered.
struct Done {
    reply: oneshot::Sender<Result<Stored, StoreError>>,
    stored: Stored,
}

/// What the writer hands the sync stage: batches whose transactions had returned from COMMIT
/// at `at`.
struct Committed {
    done: Vec<Done>,
    at: Instant,
}

/// The writer's end of the sync stage.
struct SyncStage {
    tx: mpsc::Sender<Committed>,
    /// Set by the sync stage when a sync failed (or the checkpoint stage when a checkpoint
    /// failed): nothing is committed or answered after it.
    stopped: Arc<AtomicBool>,
    wal: PathBuf,
    /// Held by the writer while it commits a group and by the checkpoint stage while it restarts
    /// the WAL: the writer waits between groups, never inside SQLite's busy handler.
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// The group-commit writer: takes every batch queued while it committed and commits them together.
/// If a group fails, each batch is retried alone so that one cannot sink the others. With a sync
/// stage (SQLite) it hands the committed batches over and goes on with the next group; without one
/// (PostgreSQL, where COMMIT is durable, or an in-memory SQLite) it answers them itself.
async fn writer(
    pool: Pool,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    groups: Arc<GroupCounters>,
    sync: Option<SyncStage>,
) {
    let mut known = Known::default();
    loop {
        let mut jobs = {
            // Held while collecting a group, not while committing it.
            let mut rx = rx.lock().await;
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
        if let Some(s) = &sync
            && s.stopped.load(Ordering::SeqCst)
        {
            // After a failed sync a record could be in the page cache but not on disk: it must
            // not be answered as stored, nor as a duplicate. Nothing is committed any more.
            for job in jobs {
                let _ = job.reply.send(Err(StoreError::Stopped {
                    path: s.wal.display().to_string(),
                    reason: "an earlier sync or checkpoint failed".into(),
                }));
            }
            continue;
        }
        // Waiting here for a WAL restart counts in the batches' queue time.
        let held = match &sync {
            Some(s) => Some(s.gate.lock().await),
            None => None,
        };
        let started = Instant::now();
        let timing = |job: &Job, commit: Duration| IngestTiming {
            queued: started.saturating_duration_since(job.queued),
            commit,
            sync: Duration::ZERO,
        };
        let mut done = Vec::with_capacity(jobs.len());
        match commit_retrying(&pool, &jobs, &mut known).await {
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
                    done.push(Done {
                        reply: job.reply,
                        stored: Stored { outcomes, timing },
                    });
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
                    match commit_retrying(&pool, std::slice::from_ref(&job), &mut known).await {
                        Ok(mut o) => {
                            let stored = Stored {
                                outcomes: o.pop().unwrap_or_default(),
                                timing: timing(&job, alone.elapsed()),
                            };
                            done.push(Done {
                                reply: job.reply,
                                stored,
                            });
                        }
                        Err(e) => {
                            let _ = job.reply.send(Err(e));
                        }
                    }
                }
            }
        }
        drop(held);
        if done.is_empty() {
            continue;
        }
        match &sync {
            None => {
                for d in done {
                    let _ = d.reply.send(Ok(d.stored));
                }
            }
            Some(s) => {
                let committed = Committed {
                    done,
                    at: Instant::now(),
                };
                if let Err(mpsc::error::SendError(c)) = s.tx.send(committed).await {
                    for d in c.done {
                        let _ = d.reply.send(Err(StoreError::WriterGone));
                    }
                }
            }
        }
    }
}

/// Whether a group's transaction failed only because of a concurrent writer's: a deadlock
/// (PostgreSQL aborts one of two transactions waiting on each other's rows) or rows another writer
/// inserted since this group looked. Run again, the group sees those rows as duplicates.
fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Raced => true,
        StoreError::Db(sqlx::Error::Database(d)) => d.code().as_deref() == Some("40P01"),
        _ => false,
    }
}

/// [`commit_group`], run again (up to [`GROUP_RETRIES`] times) while it fails [`retryable`]-ly.
async fn commit_retrying(
    pool: &Pool,
    jobs: &[Job],
    known: &mut Known,
) -> Result<Vec<Vec<Outcome>>, StoreError> {
    let mut tries = 0;
    loop {
        match commit_group(pool, jobs, known).await {
            Err(e) if retryable(&e) && tries < GROUP_RETRIES => {
                tries += 1;
                tracing::debug!("group of {} batches: {e}; again ({tries})", jobs.len());
            }
            r => return r,
        }
    }
}

/// Makes what was written to a file durable: the I/O boundary of the sync stage (a fake in the
/// tests holds syncs back to show what waits for them).
trait WalSync: Send + Sync + 'static {
    /// An open descriptor of the file, taken after the commits it must cover returned.
    type Handle: Send + 'static;
    /// Opens `path` (called in commit order, on the async task: a quick open of a local file).
    fn open(&self, path: &Path) -> std::io::Result<Self::Handle>;
    /// Blocks until everything written to the file before `open` is durable.
    fn sync(&self, handle: Self::Handle) -> std::io::Result<()>;
}

/// The real one: `fdatasync` of a descriptor opened anew by path each time (fsync is per inode,
/// and the WAL may have been deleted and created again since the last sync). A WAL that is gone
/// needs no sync: SQLite deletes it only after checkpointing it into the database and syncing
/// that (`sqlite3WalClose`).
struct Fdatasync;

impl WalSync for Fdatasync {
    type Handle = Option<std::fs::File>;

    fn open(&self, path: &Path) -> std::io::Result<Option<std::fs::File>> {
        match std::fs::File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn sync(&self, file: Option<std::fs::File>) -> std::io::Result<()> {
        file.map_or(Ok(()), |f| f.sync_data())
    }
}

/// One sync in flight: the groups it covers, its result and how long `fdatasync` took.
type SyncDone = (Vec<Committed>, Result<(), String>, Duration);

/// The sync stage (module docs): for each run of committed groups, opens the WAL and syncs it off
/// the async workers, [`SYNCS_IN_FLIGHT`] at most, and answers the groups in commit order once
/// their sync and every earlier one have returned. After a failure it answers every group with
/// the error and sets `stopped`, so that the writer commits nothing more.
async fn sync_stage<D: WalSync>(
    durability: Arc<D>,
    wal: PathBuf,
    mut rx: mpsc::Receiver<Committed>,
    groups: Arc<GroupCounters>,
    stopped: Arc<AtomicBool>,
    checkpoint: mpsc::Sender<()>,
) {
    let mut in_flight: FuturesOrdered<tokio::task::JoinHandle<SyncDone>> = FuturesOrdered::new();
    let mut failed: Option<String> = None;
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(finished) = in_flight.next(), if !in_flight.is_empty() => {
                let (batch, result, took) = match finished {
                    Ok(f) => f,
                    // The blocking task panicked or was cancelled: its groups' replies are gone
                    // with it (their requests see the writer gone); stop, since whether the WAL
                    // is durable is unknown.
                    Err(e) => (Vec::new(), Err(format!("sync task: {e}")), Duration::ZERO),
                };
                if let Err(reason) = &result {
                    if failed.is_none() {
                        tracing::error!(
                            "syncing the write-ahead log {} failed: {reason}; nothing more is \
                             acknowledged until the coordinator restarts",
                            wal.display()
                        );
                        stopped.store(true, Ordering::SeqCst);
                        failed = Some(reason.clone());
                    }
                } else {
                    groups.syncs.fetch_add(1, Ordering::Relaxed);
                    groups
                        .sync_micros
                        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                    // Full: a nudge is pending already, which covers this sync too.
                    let _ = checkpoint.try_send(());
                }
                for c in batch {
                    let sync = c.at.elapsed();
                    for d in c.done {
                        let reply = match &failed {
                            Some(reason) => Err(StoreError::Sync {
                                path: wal.display().to_string(),
                                reason: reason.clone(),
                            }),
                            None => {
                                let mut stored = d.stored;
                                stored.timing.sync = sync;
                                Ok(stored)
                            }
                        };
                        let _ = d.reply.send(reply);
                    }
                }
            }
            got = rx.recv(), if open && in_flight.len() < SYNCS_IN_FLIGHT => {
                let Some(first) = got else {
                    open = false;
                    continue;
                };
                // Everything committed by now is covered by a sync opened now.
                let mut batch = vec![first];
                while let Ok(c) = rx.try_recv() {
                    batch.push(c);
                }
                let opened = durability.open(&wal);
                let d = durability.clone();
                in_flight.push_back(tokio::task::spawn_blocking(move || {
                    let t = Instant::now();
                    let result = opened.and_then(|h| d.sync(h)).map_err(|e| e.to_string());
                    (batch, result, t.elapsed())
                }));
            }
        }
    }
}

/// A checkpoint mode of `PRAGMA wal_checkpoint`.
#[derive(Debug, Clone, Copy)]
enum CheckpointMode {
    /// Copies what it can without waiting for anyone; SQLite syncs the WAL before copying and the
    /// database after, if it copied everything.
    Passive,
    /// As PASSIVE (with the writer lock held), then marks the WAL to be written again from its
    /// start by the next commit if no reader still uses it.
    Restart,
    /// As RESTART, and truncates the WAL file to zero bytes.
    Truncate,
}

/// One `PRAGMA wal_checkpoint` answer, in frames: whether a reader or writer kept it from
/// finishing, the WAL's length and how much of it is copied into the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkpointed {
    busy: bool,
    log: i64,
    done: i64,
}

async fn checkpoint(pool: &SqlitePool, mode: CheckpointMode) -> Result<Checkpointed, StoreError> {
    let sql = match mode {
        CheckpointMode::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
        CheckpointMode::Restart => "PRAGMA wal_checkpoint(RESTART)",
        CheckpointMode::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
    };
    let row = sqlx::query(sql).fetch_one(pool).await?;
    Ok(Checkpointed {
        busy: row.try_get::<i64, _>(0)? != 0,
        // -1 when the database is not in WAL mode: nothing to checkpoint.
        log: row.try_get::<i64, _>(1)?.max(0),
        done: row.try_get::<i64, _>(2)?.max(0),
    })
}

/// `fdatasync` of the database file, off the async workers.
async fn sync_database(db: &Path) -> Result<(), StoreError> {
    let path = db.to_path_buf();
    let result = tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_data())
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    result.map_err(|e| StoreError::Sync {
        path: db.display().to_string(),
        reason: e.to_string(),
    })
}

/// The checkpoint stage (module docs, "Checkpoints"): after WAL syncs, at most every
/// `tuning.every`, a PASSIVE checkpoint beside the writer on its own connection, then an
/// `fdatasync` of the database so that the pages it copied are on disk before any restart; when
/// that checkpoint found the WAL at `tuning.restart_bytes`, a RESTART checkpoint while the writer
/// waits between groups (the gate), and when the writer has been idle for `tuning.idle`, a
/// TRUNCATE one. A failed checkpoint or database sync stops the store, as a failed WAL sync does.
async fn checkpoint_stage(
    pool: SqlitePool,
    db: PathBuf,
    gate: Arc<tokio::sync::Mutex<()>>,
    mut nudges: mpsc::Receiver<()>,
    stopped: Arc<AtomicBool>,
    groups: Arc<GroupCounters>,
    tuning: Checkpoints,
) {
    // The threshold in frames: a frame is a page and its 24-byte header.
    let page = match sqlx::query("PRAGMA page_size").fetch_one(&pool).await {
        Ok(row) => row.try_get::<i64, _>(0).unwrap_or(4096).max(512) as u64,
        Err(e) => {
            tracing::warn!(
                "reading the page size of {}: {e}; taking 4096",
                db.display()
            );
            4096
        }
    };
    let restart_frames = (tuning.restart_bytes / (page + 24)).max(1) as i64;
    let mut last: Option<tokio::time::Instant> = None;
    // The WAL's length at the last checkpoint: when idle, a WAL with frames is truncated.
    let mut frames = 0i64;
    loop {
        let nudged = tokio::time::timeout(tuning.idle, nudges.recv()).await;
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let step = match nudged {
            // The sync stage has ended: the store is gone.
            Ok(None) => return,
            Ok(Some(())) => {
                if let Some(l) = last {
                    tokio::time::sleep_until(l + tuning.every).await;
                }
                last = Some(tokio::time::Instant::now());
                passive_step(&pool, &db, &gate, &groups, restart_frames).await
            }
            Err(_idle) if frames > 0 => {
                restart(&pool, &gate, &groups, CheckpointMode::Truncate).await
            }
            Err(_idle) => continue,
        };
        match step {
            Ok(c) => frames = c.log,
            Err(e) => {
                tracing::error!(
                    "checkpointing {} failed: {e}; nothing more is acknowledged until the \
                     coordinator restarts",
                    db.display()
                );
                stopped.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// A PASSIVE checkpoint and the database sync after it; a restart if the WAL is long.
async fn passive_step(
    pool: &SqlitePool,
    db: &Path,
    gate: &tokio::sync::Mutex<()>,
    groups: &GroupCounters,
    restart_frames: i64,
) -> Result<Checkpointed, StoreError> {
    let c = checkpoint(pool, CheckpointMode::Passive).await?;
    groups.checkpoints.fetch_add(1, Ordering::Relaxed);
    groups
        .wal_frames_max
        .fetch_max(c.log as u64, Ordering::Relaxed);
    if c.done > 0 {
        // SQLite syncs the database only when it copied the whole WAL, which under load (the
        // writer appending meanwhile) it seldom does; a restart's sync then has only the tail left.
        sync_database(db).await?;
    }
    if c.log >= restart_frames {
        // RESTART rather than TRUNCATE: the next commit overwrites the file in place, and the
        // writer does not wait for the file system to free and reallocate it.
        return restart(pool, gate, groups, CheckpointMode::Restart).await;
    }
    Ok(c)
}

/// A RESTART or TRUNCATE checkpoint while the writer waits between groups. Busy (a reader still
/// on the WAL) leaves the WAL as it is, to be tried again.
async fn restart(
    pool: &SqlitePool,
    gate: &tokio::sync::Mutex<()>,
    groups: &GroupCounters,
    mode: CheckpointMode,
) -> Result<Checkpointed, StoreError> {
    let held = gate.lock().await;
    let t = Instant::now();
    let c = checkpoint(pool, mode).await;
    drop(held);
    groups.restarts.fetch_add(1, Ordering::Relaxed);
    groups
        .restart_micros
        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    let c = c?;
    if c.busy {
        tracing::debug!("WAL restart busy (a reader on the WAL): {c:?}");
    }
    Ok(c)
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

/// The id a key's text gets in `names` when ingest first meets it: 63 bits of its SHA-256, at or
/// above 2^62 (migration 0003 numbered the names it found from 1). Derived rather than counted,
/// so that PostgreSQL's writers (and coordinators sharing a database) give a new name the same
/// id without asking each other. Forging a key onto a given name's id takes ~2^62 tries, and by
/// chance a million names share one with odds of about 1 in 10^7; should it happen, the later
/// name's records are refused, never credited to the other.
fn name_id(name: &str) -> i64 {
    let d = sha2::Sha256::digest(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (i64::from_be_bytes(b) & i64::MAX) | (1 << 62)
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

/// `select` (which ends in `IN (`) with `n` placeholders and the closing parenthesis: a question
/// about `n` keys in one round trip.
fn in_list_sql(select: &str, n: usize, numbered: bool) -> String {
    let mut sql = String::from(select);
    placeholders(&mut sql, 1, n, numbered);
    sql.push(')');
    sql
}

/// Which record ids of a chunk are stored already.
const EXISTING_IDS: &str = "SELECT record_id FROM records WHERE record_id IN (";
/// The ids of names.
const NAME_IDS: &str = "SELECT name, id FROM names WHERE name IN (";
/// Which hosts of a group are enrolled.
const ENROLLED_HOSTS: &str = "SELECT host FROM hosts WHERE host IN (";
/// What the machine types of a group weigh.
const TYPE_WEIGHTS: &str =
    "SELECT digest, CAST(weight_milli AS BIGINT) FROM machine_types WHERE digest IN (";

/// `head` (`INSERT INTO t (columns) VALUES `) with `rows` rows of `cols` placeholders, leaving
/// rows whose keys are stored already alone (`ON CONFLICT DO NOTHING`).
fn insert_rows_sql(head: &str, rows: usize, cols: usize, numbered: bool) -> String {
    let mut sql = String::from(head);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        placeholders(&mut sql, i * cols + 1, cols, numbered);
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

/// The multi-row INSERT of `rows` new names (id, name).
fn names_sql(rows: usize, numbered: bool) -> String {
    insert_rows_sql("INSERT INTO names (id, name) VALUES ", rows, 2, numbered)
}

/// The multi-row INSERT for `rows` records. No RETURNING: sqlx hands each returned row across a
/// channel from SQLite's worker thread, which cost more than the insert itself.
fn insert_sql(rows: usize, numbered: bool) -> String {
    insert_rows_sql(
        "INSERT INTO records (record_id, host, publisher, machine_type, machine_id, start_s, end_s, \
         cpu_ms, wall_ms, cores, benchmark, outcome, credit, day, received) VALUES ",
        rows,
        15,
        numbered,
    )
}

/// What a writer has learnt of keys whose rows never change once stored: enrolled hosts (nothing
/// un-enrols a host), machine types' weights (a type is stored once, `ON CONFLICT DO NOTHING`)
/// and the ids of names.
/// Only what the database answered is kept: a host or type it did not know is asked again in the
/// next group, as it may be enrolled or published meanwhile. Steady ingest from known hosts then
/// costs the group no lookup at all.
#[derive(Default)]
struct Known {
    hosts: HashSet<String>,
    weights: HashMap<String, i64>,
    /// Ids of names in `names` (rows that never change).
    ids: HashMap<String, i64>,
}

/// Keys a [`Known`] holds before it starts again from empty (a bound, not a tuning knob: each key is
/// ~50 bytes, and a forgotten key costs only one lookup).
const KNOWN_MAX: usize = 100_000;

impl Known {
    fn bound(&mut self) {
        if self.hosts.len() > KNOWN_MAX {
            self.hosts.clear();
        }
        if self.weights.len() > KNOWN_MAX {
            self.weights.clear();
        }
        if self.ids.len() > KNOWN_MAX {
            self.ids.clear();
        }
    }
}

/// Checks, prices and inserts the records of `jobs` in one transaction; one outcome list per job.
async fn commit_group(
    pool: &Pool,
    jobs: &[Job],
    known: &mut Known,
) -> Result<Vec<Vec<Outcome>>, StoreError> {
    let numbered = matches!(pool, Pool::Postgres(_));
    with_pool!(pool, |p, begin| {
        let mut tx = p.begin_with(begin).await?;
        let mut out: Vec<Vec<Outcome>> = jobs
            .iter()
            .map(|j| Vec::with_capacity(j.records.len()))
            .collect();
        let mut flagged: HashSet<String> = HashSet::new();
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        let mut pending: Vec<Pending<'_>> = Vec::new();
        // Key text (base58 of the peer id, hex of a digest) costs microseconds per key; a group
        // names few keys, each turned into text once.
        let mut names: HashMap<PublicKey, String> = HashMap::new();
        let mut type_names: HashMap<Digest, String> = HashMap::new();
        for r in jobs.iter().flat_map(|j| &j.records) {
            names.entry(r.host).or_insert_with(|| r.host.to_string());
            type_names
                .entry(r.machine_type)
                .or_insert_with(|| r.machine_type.to_string());
        }
        // Which hosts are enrolled and what each machine type weighs, for the keys not already
        // [`Known`]: one query each per group (per thousand keys), not one per key. Each is a
        // round trip to SQLite's worker thread inside the writer's transaction.
        known.bound();
        let hosts: Vec<&String> = names
            .values()
            .filter(|h| !known.hosts.contains(*h))
            .collect();
        for chunk in hosts.chunks(INSERT_CHUNK) {
            let mut q = sqlx::query(AssertSqlSafe(in_list_sql(
                ENROLLED_HOSTS,
                chunk.len(),
                numbered,
            )));
            for h in chunk {
                q = q.bind((*h).clone());
            }
            for row in q.fetch_all(&mut *tx).await? {
                known.hosts.insert(row.get::<String, _>(0));
            }
        }
        let types: Vec<&String> = type_names
            .values()
            .filter(|t| !known.weights.contains_key(*t))
            .collect();
        for chunk in types.chunks(INSERT_CHUNK) {
            let mut q = sqlx::query(AssertSqlSafe(in_list_sql(
                TYPE_WEIGHTS,
                chunk.len(),
                numbered,
            )));
            for t in chunk {
                q = q.bind((*t).clone());
            }
            for row in q.fetch_all(&mut *tx).await? {
                known
                    .weights
                    .insert(row.get::<String, _>(0), row.get::<i64, _>(1));
            }
        }
        for (ji, job) in jobs.iter().enumerate() {
            let now = job.now;
            for r in &job.records {
                let host = names
                    .entry(r.host)
                    .or_insert_with(|| r.host.to_string())
                    .clone();
                if !known.hosts.contains(&host) {
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
                let mt = type_names
                    .entry(r.machine_type)
                    .or_insert_with(|| r.machine_type.to_string())
                    .clone();
                // An unknown machine type weighs 1.0 (docs/credit.md).
                let weight = known.weights.get(&mt).copied().unwrap_or(1000);
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
        // Names only of records that passed the checks: a host that is not enrolled adds none.
        let mut new_names: Vec<&String> = pending
            .iter()
            .flat_map(|pr| [&pr.host, &pr.publisher, &pr.machine_type])
            .filter(|n| !known.ids.contains_key(*n))
            .collect();
        new_names.sort_unstable();
        new_names.dedup();
        // Stored if new and learnt: one INSERT and one SELECT per thousand names not already
        // [`Known`], in name order (PostgreSQL's writers then lock the rows in one order). A name
        // still without an id after that lost it to another name ([`name_id`]). What is learnt
        // here is kept only once the transaction commits: rolled back, a new name's row is gone.
        let mut learnt: HashMap<String, i64> = HashMap::new();
        for chunk in new_names.chunks(INSERT_CHUNK) {
            let mut q = sqlx::query(AssertSqlSafe(names_sql(chunk.len(), numbered)));
            for n in chunk {
                q = q.bind(name_id(n)).bind((*n).clone());
            }
            q.execute(&mut *tx).await?;
            let mut q = sqlx::query(AssertSqlSafe(in_list_sql(NAME_IDS, chunk.len(), numbered)));
            for n in chunk {
                q = q.bind((*n).clone());
            }
            for row in q.fetch_all(&mut *tx).await? {
                learnt.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
        }
        let id_of = |n: &String| known.ids.get(n).or_else(|| learnt.get(n)).copied();
        pending.retain(|pr| {
            let lost = [&pr.host, &pr.publisher, &pr.machine_type]
                .into_iter()
                .find(|n| id_of(n).is_none());
            if let Some(n) = lost {
                out[pr.job][pr.pos] = Outcome::Rejected {
                    reason: format!("the key {n} has no id of its own on this coordinator"),
                };
            }
            lost.is_none()
        });
        // One global insert order: two groups holding some of the same ids (on PostgreSQL's
        // several writers) then wait for each other's rows in the same order, never in a cycle.
        pending.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        for chunk in pending.chunks(INSERT_CHUNK) {
            // Duplicates are rare (a ledger re-sending after a lost answer): ask which ids exist,
            // usually getting no rows back, and insert the rest.
            let mut q = sqlx::query(AssertSqlSafe(in_list_sql(
                EXISTING_IDS,
                chunk.len(),
                numbered,
            )));
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
                    .bind(id_of(&pr.host))
                    .bind(id_of(&pr.publisher))
                    .bind(id_of(&pr.machine_type))
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
                // Another writer (of this store, or a second coordinator on the same PostgreSQL)
                // stored some of these ids since we looked: give up this group; it is run again
                // (`commit_retrying`) and then sees those ids as duplicates.
                return Err(StoreError::Raced);
            }
        }
        tx.commit().await?;
        known.ids.extend(learnt);
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    use gleaner::{Digest, Id16, OutcomeCode, SecretKey};

    /// A sync stage's disk that holds each sync until the test releases it (by its number, in
    /// the order the syncs were opened), and can fail them.
    #[derive(Default)]
    struct HeldSync {
        state: Mutex<Held>,
        changed: Condvar,
    }

    #[derive(Default)]
    struct Held {
        opened: Vec<PathBuf>,
        started: usize,
        released: HashSet<usize>,
        fail: bool,
    }

    impl HeldSync {
        fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn release(&self, n: usize, fail: bool) {
            let mut s = self.lock();
            s.released.insert(n);
            s.fail = fail;
            self.changed.notify_all();
        }
    }

    impl WalSync for HeldSync {
        type Handle = usize;

        fn open(&self, path: &Path) -> std::io::Result<usize> {
            let mut s = self.lock();
            s.opened.push(path.to_path_buf());
            Ok(s.opened.len() - 1)
        }

        fn sync(&self, n: usize) -> std::io::Result<()> {
            let mut s = self.lock();
            s.started += 1;
            while !s.released.contains(&n) {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.fail {
                Err(std::io::Error::other("injected: the disk went away"))
            } else {
                Ok(())
            }
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn records(host: &SecretKey, batch: u8, n: u8) -> Vec<UsageRecord> {
        let end = now() - 60;
        (0..n)
            .map(|i| UsageRecord {
                v: 1,
                record_id: Id16([batch, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                host: host.public(),
                machine_id: Id16([batch; 16]),
                publisher: host.public(),
                machine_type: Digest([3; 32]),
                start: end - 600,
                end,
                cpu_ms: 300_000,
                wall_ms: 600_000,
                peak_memory: 0,
                cores: 1,
                benchmark: 1000,
                outcome: OutcomeCode::Success,
            })
            .collect()
    }

    /// A store on a SQLite file in `dir` whose WAL syncs `disk` holds, with one enrolled host.
    async fn held_store(dir: &Path, disk: Arc<HeldSync>) -> (Store, SecretKey) {
        let url = format!("sqlite://{}", dir.join("c.db").display());
        enrolled_store(&url, disk, Checkpoints::default(), [9; 32]).await
    }

    /// A store at `url` with these WAL syncs and checkpoint tuning, and one enrolled host (the
    /// key from `seed`).
    async fn enrolled_store<D: WalSync>(
        url: &str,
        disk: Arc<D>,
        tuning: Checkpoints,
        seed: [u8; 32],
    ) -> (Store, SecretKey) {
        let store = Store::open_with(url, disk, tuning)
            .await
            .expect("store opens");
        store
            .add_account("a", "t", "tok", now())
            .await
            .expect("account");
        let host = SecretKey::from_seed(seed);
        store
            .enrol(&host.public(), "a", now())
            .await
            .expect("enrol");
        (store, host)
    }

    /// Polls `cond` every 10 ms for up to a minute (a loaded CI machine is slow, never wrong).
    async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_answers_after_the_wal_sync_and_commits_the_next_group_meanwhile() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Arc::new(HeldSync::default());
        let (store, host) = held_store(dir.path(), disk.clone()).await;

        let s = store.clone();
        let a = records(&host, 1, 20);
        let first = tokio::spawn(async move { s.ingest_timed(a, now()).await });
        eventually("the first group's sync", async || disk.lock().started == 1).await;
        // Committed (readable) but not answered: the answer waits for the sync.
        eventually("the first group committed", async || {
            store.stats().await.ok().map(|s| s.records) == Some(20)
        })
        .await;
        assert!(
            !first.is_finished(),
            "answered before its WAL sync returned"
        );

        // A batch arriving while that sync runs is committed at once and gets its own sync.
        let s = store.clone();
        let b = records(&host, 2, 30);
        let second = tokio::spawn(async move { s.ingest_timed(b, now()).await });
        eventually("the second group's sync beside the first", async || {
            disk.lock().started == 2
        })
        .await;
        assert_eq!(store.stats().await.ok().map(|s| s.records), Some(50));

        // Its sync returning first does not answer it ahead of the earlier group.
        disk.release(1, false);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "answered ahead of an earlier group");
        assert!(!first.is_finished());

        disk.release(0, false);
        for (task, n) in [(first, 20), (second, 30)] {
            let stored = task.await.expect("task").expect("stored");
            assert_eq!(stored.outcomes, vec![Outcome::Accepted; n]);
            assert!(stored.timing.sync > Duration::ZERO);
        }
        let wal = PathBuf::from(format!("{}-wal", dir.path().join("c.db").display()));
        let opened = disk.lock().opened.clone();
        assert_eq!(opened.len(), 2);
        for p in opened {
            assert_eq!(
                std::fs::canonicalize(&p).ok(),
                std::fs::canonicalize(&wal).ok(),
                "synced {} rather than the database's WAL",
                p.display()
            );
        }
        assert_eq!(store.group_commits().syncs, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_answers_an_error_and_stops_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = Arc::new(HeldSync::default());
        let (store, host) = held_store(dir.path(), disk.clone()).await;
        disk.release(0, true);
        let err = store
            .ingest(records(&host, 1, 5), now())
            .await
            .expect_err("a batch whose sync failed is not acknowledged");
        assert!(
            matches!(&err, StoreError::Sync { reason, .. } if reason.contains("disk went away")),
            "{err}"
        );
        // Afterwards nothing is committed or answered, not even as a duplicate.
        for batch in [records(&host, 1, 5), records(&host, 2, 5)] {
            let err = store.ingest(batch, now()).await.expect_err("store stopped");
            assert!(matches!(err, StoreError::Stopped { .. }), "{err}");
        }
        assert_eq!(store.stats().await.ok().map(|s| s.records), Some(5));
        assert!(err_text_says_restart(&store, &host).await);
    }

    async fn err_text_says_restart(store: &Store, host: &SecretKey) -> bool {
        match store.ingest(records(host, 3, 1), now()).await {
            Err(e) => e.to_string().contains("restart the coordinator"),
            Ok(_) => false,
        }
    }

    /// `n` records of `host` whose ids are spread over the whole key space (hashes of `seq`), so
    /// that every group touches pages all over the primary-key index, as real hosts' ids do.
    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    fn spread_records(host: &SecretKey, seq: u64, n: u64) -> Vec<UsageRecord> {
        let mut rs = records(host, 0, 1);
        let template = rs.pop().expect("one record");
        (seq..seq + n)
            .map(|k| {
                let h = sha2::Sha256::digest(k.to_be_bytes());
                let mut id = [0u8; 16];
                id.copy_from_slice(&h[..16]);
                UsageRecord {
                    record_id: Id16(id),
                    ..template.clone()
                }
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_sustained_ingest_and_is_truncated_when_idle() {
        const RESTART: u64 = 4 << 20;
        // The WAL may pass the threshold by what the writer appends while the stage's PASSIVE
        // runs and while it waits for the gate: a few groups (generous for a loaded debug build).
        const BOUND: u64 = 4 * RESTART;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bounded.db");
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let tuning = Checkpoints {
            every: Duration::from_millis(20),
            restart_bytes: RESTART,
            idle: Duration::from_millis(300),
        };
        let (store, host) = enrolled_store(
            &format!("sqlite://{}", path.display()),
            Arc::new(Fdatasync),
            tuning,
            [5; 32],
        )
        .await;

        // The WAL's size, sampled all along.
        let watching = Arc::new(AtomicBool::new(true));
        let (w, p) = (watching.clone(), wal.clone());
        let watcher = tokio::spawn(async move {
            let mut max = 0;
            while w.load(Ordering::SeqCst) {
                max = max.max(file_len(&p));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            max
        });

        // Four ledgers posting back to back: the writer is never idle for long.
        const TASKS: u64 = 4;
        const BATCHES: u64 = 60;
        const BATCH: u64 = 100;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (s, host) = (store.clone(), host.clone());
            tasks.push(tokio::spawn(async move {
                for b in 0..BATCHES {
                    let seq = (t * BATCHES + b) * BATCH;
                    let out = s
                        .ingest(spread_records(&host, seq, BATCH), now())
                        .await
                        .expect("stored");
                    assert_eq!(out, vec![Outcome::Accepted; BATCH as usize]);
                }
            }));
        }
        for t in tasks {
            t.await.expect("ledger task");
        }
        watching.store(false, Ordering::SeqCst);
        let max = watcher.await.expect("watcher");

        let total = (TASKS * BATCHES * BATCH) as i64;
        assert_eq!(
            store.stats().await.ok().map(|s| s.records),
            Some(total),
            "every acknowledged record is stored once"
        );
        let g = store.group_commits();
        eprintln!("WAL at most {max} bytes (bound {BOUND}); {g:?}");
        // The load took the WAL past the threshold again and again, so the stage had to restart
        // it under load (without the stage the WAL keeps every frame: far beyond the bound).
        assert!(g.restarts >= 3, "{g:?}");
        assert!(
            max <= BOUND,
            "the WAL reached {max} bytes, over the bound of {BOUND}; {g:?}"
        );

        // Idle: the stage truncates the WAL, and everything is still there.
        eventually("the idle WAL truncated", async || file_len(&wal) == 0).await;
        assert_eq!(store.stats().await.ok().map(|s| s.records), Some(total));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_real_sync_stage_syncs_the_wal_of_the_database() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("real.db");
        let store = Store::open(&format!("sqlite://{}", path.display()))
            .await
            .expect("store");
        store
            .add_account("a", "t", "tok", now())
            .await
            .expect("account");
        let host = SecretKey::from_seed([7; 32]);
        store
            .enrol(&host.public(), "a", now())
            .await
            .expect("enrol");
        let stored = store
            .ingest_timed(records(&host, 1, 10), now())
            .await
            .expect("stored");
        assert_eq!(stored.outcomes, vec![Outcome::Accepted; 10]);
        assert!(stored.timing.sync > Duration::ZERO);
        assert!(store.group_commits().syncs >= 1);
        assert!(PathBuf::from(format!("{}-wal", path.display())).exists());
        // A WAL that is gone (checkpointed and deleted) needs no sync.
        let gone = Fdatasync
            .open(&dir.path().join("nothing-wal"))
            .expect("a missing WAL is no error");
        assert!(gone.is_none());
        assert!(Fdatasync.sync(gone).is_ok());
    }

    /// One group holds batches from an enrolled and an unenrolled host over a weighted and an
    /// unknown machine type: the hosts and weights are looked up for the whole group at once, and
    /// each record is still answered by its own host and priced by its own type.
    #[tokio::test]
    async fn a_group_answers_each_record_by_its_own_host_and_type() {
        let (store, host) = enrolled_store(
            "sqlite::memory:",
            Arc::new(Fdatasync),
            Checkpoints::default(),
            [8; 32],
        )
        .await;
        let stranger = SecretKey::from_seed([9; 32]);
        let heavy = Digest([4; 32]);
        let Pool::Sqlite(db) = &store.pool else {
            panic!("an in-memory store is SQLite");
        };
        sqlx::query(
            "INSERT INTO machine_types (digest, publisher, name, version, weight_milli) \
             VALUES ($1, $2, 'heavy', 1, 2500)",
        )
        .bind(heavy.to_string())
        .bind(host.public().to_string())
        .execute(db)
        .await
        .expect("machine type");
        let mut weighted = records(&host, 1, 2);
        for r in &mut weighted {
            r.machine_type = heavy;
        }
        let jobs: Vec<Job> = [
            weighted.clone(),
            records(&stranger, 2, 2),
            records(&host, 3, 1),
        ]
        .into_iter()
        .map(|records| Job {
            records,
            now: now(),
            queued: Instant::now(),
            reply: oneshot::channel().0,
        })
        .collect();
        let mut known = Known::default();
        let outs = commit_group(&store.pool, &jobs, &mut known)
            .await
            .expect("group commits");
        let retry =
            |o: &Outcome| matches!(o, Outcome::Retry { reason } if reason.contains("not enrolled"));
        assert_eq!(outs[0], vec![Outcome::Accepted; 2]);
        assert!(
            outs[1].len() == 2 && outs[1].iter().all(retry),
            "{:?}",
            outs[1]
        );
        assert_eq!(outs[2], vec![Outcome::Accepted]);
        let stored: HashMap<String, f64> = sqlx::query("SELECT record_id, credit FROM records")
            .fetch_all(db)
            .await
            .expect("records")
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<f64, _>(1)))
            .collect();
        assert_eq!(
            stored.len(),
            3,
            "only the enrolled host's records: {stored:?}"
        );
        let plain = &jobs[2].records[0];
        assert_eq!(
            stored[&weighted[0].record_id.to_string()],
            credit(&weighted[0], 2500).credit
        );
        assert_eq!(
            stored[&plain.record_id.to_string()],
            credit(plain, 1000).credit
        );
        assert!(stored[&weighted[0].record_id.to_string()] > stored[&plain.record_id.to_string()]);
        // The writer remembers only what the database knew: the stranger, enrolled since, is
        // asked about again and its records are taken in the next group.
        assert!(known.hosts.contains(&host.public().to_string()));
        assert!(!known.hosts.contains(&stranger.public().to_string()));
        store
            .enrol(&stranger.public(), "a", now())
            .await
            .expect("enrol");
        let again = [Job {
            records: records(&stranger, 2, 2),
            now: now(),
            queued: Instant::now(),
            reply: oneshot::channel().0,
        }];
        // Before it was enrolled, the stranger's records named nothing into `names`.
        let named = |n: String| {
            sqlx::query("SELECT COUNT(*) FROM names WHERE name = $1")
                .bind(n)
                .fetch_one(db)
        };
        assert_eq!(
            named(stranger.public().to_string())
                .await
                .expect("names")
                .get::<i64, _>(0),
            0
        );
        let outs = commit_group(&store.pool, &again, &mut known)
            .await
            .expect("group commits");
        assert_eq!(outs[0], vec![Outcome::Accepted; 2]);
        assert_eq!(
            named(stranger.public().to_string())
                .await
                .expect("names")
                .get::<i64, _>(0),
            1
        );
    }

    /// A group that rolls back takes the names it stored with it, and the writer forgets their
    /// ids too: the next group stores them again instead of naming rows that do not exist.
    #[tokio::test]
    async fn names_of_a_group_that_rolled_back_are_stored_again() {
        let (store, host) = enrolled_store(
            "sqlite::memory:",
            Arc::new(Fdatasync),
            Checkpoints::default(),
            [8; 32],
        )
        .await;
        let Pool::Sqlite(db) = &store.pool else {
            panic!("an in-memory store is SQLite");
        };
        // A record claiming 4242 ms fails its INSERT, after the group has stored its names.
        sqlx::query(
            "CREATE TRIGGER fail_4242 BEFORE INSERT ON records WHEN NEW.cpu_ms = 4242 \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .execute(db)
        .await
        .expect("trigger");
        let job = |records| Job {
            records,
            now: now(),
            queued: Instant::now(),
            reply: oneshot::channel().0,
        };
        let mut failing = records(&host, 1, 1);
        failing[0].cpu_ms = 4242;
        let mut known = Known::default();
        let failed = commit_group(&store.pool, &[job(failing)], &mut known).await;
        assert!(failed.is_err(), "{failed:?}");
        assert!(known.ids.is_empty(), "{:?}", known.ids);
        let outs = commit_group(&store.pool, &[job(records(&host, 2, 2))], &mut known)
            .await
            .expect("group commits");
        assert_eq!(outs[0], vec![Outcome::Accepted; 2]);
        // The host (which is also the publisher here) and the machine type.
        assert_eq!(known.ids.len(), 2, "{:?}", known.ids);
        let hosts: i64 = sqlx::query("SELECT COUNT(DISTINCT host) FROM records")
            .fetch_one(db)
            .await
            .expect("records")
            .get(0);
        assert_eq!(hosts, 1);
    }
}
