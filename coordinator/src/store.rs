//! Durable storage of accounts, hosts and verified usage records (sqlx; SQLite embedded by default
//! with WAL and synchronous=FULL, so an acknowledged batch survives a crash).

use std::str::FromStr;

use gleaner::credit::credit;
use gleaner::{PublicKey, UsageRecord};
use serde::Serialize;
use sha2::Digest as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct StoreError(#[from] sqlx::Error);

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Accepted,
    Duplicate,
    Rejected { reason: String },
    Retry { reason: String },
}

/// The coordinator's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// One row of a leaderboard.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row2 {
    pub key: String,
    pub credit: f64,
    pub cpu_hours: f64,
    pub records: i64,
    /// Recent average credit per day (BOINC's RAC), decayed to now.
    pub rac: f64,
}

/// Everything the dashboard shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
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

impl Store {
    /// Opens (creating if needed) the database at `url` (`sqlite://path` or `sqlite::memory:`)
    /// and applies the migrations.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError(e.into()))?;
        Ok(Store { pool })
    }

    /// Creates an account; returns false if it exists.
    pub async fn add_account(
        &self,
        name: &str,
        team: &str,
        token: &str,
        now: u64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO accounts (name, team, token_hash, created) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(team)
        .bind(token_hash(token))
        .bind(now as i64)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Whether `token` is the account's enrolment token.
    pub async fn check_token(&self, account: &str, token: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT token_hash FROM accounts WHERE name = ?")
            .bind(account)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some_and(|r| r.get::<String, _>(0) == token_hash(token)))
    }

    /// Links a host to an account (re-enrolling moves it).
    pub async fn enrol(&self, host: &PublicKey, account: &str, now: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hosts (host, account, enrolled) VALUES (?, ?, ?) \
             ON CONFLICT (host) DO UPDATE SET account = excluded.account",
        )
        .bind(host.to_string())
        .bind(account)
        .bind(now as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Registers a machine type's name and weight (from a verified signed definition).
    pub async fn add_machine_type(
        &self,
        digest: &str,
        mt: &gleaner::MachineType,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO machine_types (digest, publisher, name, version, weight_milli) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(digest)
        .bind(mt.publisher.to_string())
        .bind(&mt.name)
        .bind(mt.version as i64)
        .bind(i64::from(mt.weight_milli))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores verified records in one transaction and returns one outcome per record; the
    /// outcomes are only returned after the commit is durable.
    pub async fn ingest(
        &self,
        records: &[UsageRecord],
        now: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let host = r.host.to_string();
            let enrolled = sqlx::query("SELECT 1 FROM hosts WHERE host = ?")
                .bind(&host)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !enrolled {
                out.push(Outcome::Retry {
                    reason: format!("host {host} is not enrolled"),
                });
                continue;
            }
            if r.end > now + 300 {
                out.push(Outcome::Rejected {
                    reason: format!("ends at {} which is in the future (now {now})", r.end),
                });
                continue;
            }
            if r.wall_ms > 31 * 86_400_000 {
                out.push(Outcome::Rejected {
                    reason: "a single record cannot cover more than 31 days".into(),
                });
                continue;
            }
            let weight: i64 =
                sqlx::query("SELECT weight_milli FROM machine_types WHERE digest = ?")
                    .bind(r.machine_type.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|row| row.get::<i64, _>(0))
                    .unwrap_or(1000);
            let c = credit(r, weight.clamp(1, 100_000) as u32);
            if c.scale_clamped {
                sqlx::query("UPDATE hosts SET flagged = 1, flag_reason = ? WHERE host = ?")
                    .bind(format!(
                        "benchmark {} outside the allowed scale",
                        r.benchmark
                    ))
                    .bind(&host)
                    .execute(&mut *tx)
                    .await?;
            }
            let res = sqlx::query(
                "INSERT INTO records (record_id, host, publisher, machine_type, machine_id, start_s, end_s, \
                 cpu_ms, wall_ms, cores, benchmark, outcome, credit, day, received) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(r.record_id.to_string())
            .bind(&host)
            .bind(r.publisher.to_string())
            .bind(r.machine_type.to_string())
            .bind(r.machine_id.to_string())
            .bind(r.start as i64)
            .bind(r.end as i64)
            .bind(r.cpu_ms as i64)
            .bind(r.wall_ms as i64)
            .bind(i64::from(r.cores))
            .bind(i64::from(r.benchmark))
            .bind(r.outcome as u8 as i64)
            .bind(c.credit)
            .bind((r.end / 86_400) as i64)
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
            out.push(if res.rows_affected() == 1 {
                Outcome::Accepted
            } else {
                Outcome::Duplicate
            });
        }
        tx.commit().await?;
        Ok(out)
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
        let mut rac: std::collections::HashMap<String, gleaner::credit::Rac> = Default::default();
        for row in sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?
        {
            let k: String = row.get(0);
            let r = rac.entry(k).or_default();
            *r = r.add(row.get::<f64, _>(2), row.get::<i64, _>(1).max(0) as u64);
        }
        for row in &mut rows {
            row.rac = rac.get(&row.key).map(|r| r.at(now).value).unwrap_or(0.0);
        }
        Ok(rows)
    }

    async fn board_totals(
        &self,
        key: &'static str,
        join: &'static str,
    ) -> Result<Vec<Row2>, StoreError> {
        let sql = format!(
            "SELECT {key} AS k, SUM(r.credit), SUM(r.cpu_ms), COUNT(*) FROM records r {join} \
             GROUP BY k ORDER BY SUM(r.credit) DESC LIMIT 50"
        );
        // `key` and `join` are fixed strings from this file, never client input.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| Row2 {
                key: row.get::<String, _>(0),
                credit: row.get::<f64, _>(1),
                cpu_hours: row.get::<i64, _>(2) as f64 / 3_600_000.0,
                records: row.get::<i64, _>(3),
                rac: 0.0,
            })
            .collect())
    }

    /// Totals, leaderboards and credit per day.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let t = sqlx::query(
            "SELECT COALESCE(SUM(credit), 0.0), COALESCE(SUM(cpu_ms), 0), COUNT(*) FROM records",
        )
        .fetch_one(&self.pool)
        .await?;
        let hosts: i64 = sqlx::query("SELECT COUNT(*) FROM hosts")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        let per_day = sqlx::query("SELECT day, SUM(credit) FROM records GROUP BY day ORDER BY day")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| (r.get::<i64, _>(0), r.get::<f64, _>(1)))
            .collect();
        let project_join = "LEFT JOIN (SELECT publisher AS p, MIN(name) AS n FROM machine_types GROUP BY publisher) m ON m.p = r.publisher";
        Ok(Stats {
            total_credit: t.get::<f64, _>(0),
            total_cpu_hours: t.get::<i64, _>(1) as f64 / 3_600_000.0,
            records: t.get::<i64, _>(2),
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
            projects: self
                .board("COALESCE(m.n, r.publisher)", project_join)
                .await?,
            per_day,
        })
    }

    /// Credit per day of one host.
    pub async fn host_days(&self, host: &str) -> Result<Vec<(i64, f64)>, StoreError> {
        Ok(sqlx::query(
            "SELECT day, SUM(credit) FROM records WHERE host = ? GROUP BY day ORDER BY day",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<f64, _>(1)))
        .collect())
    }
}
