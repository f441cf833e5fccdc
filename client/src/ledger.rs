//! The durable local ledger: signed usage records waiting for the coordinator (the outbox), records it
//! acknowledged, and the machines the factory is running (for crash recovery).
//!
//! Backed by redb with immediate durability: every call that changes the ledger has reached the disk
//! (fsync) when it returns, so a record survives `kill -9` and the machine table always says which
//! machines may need adopting. A machine's final record and the removal of the machine from the table
//! happen in one transaction, so a crash can neither lose nor duplicate it.

use std::path::Path;

use gleaner::{Envelope, Id16, UsageRecord};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const PENDING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pending");
const DELIVERED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("delivered");
const REJECTED: TableDefinition<&[u8], (&[u8], &str)> = TableDefinition::new("rejected");
const MACHINES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("machines");

/// A ledger failure (the storage engine's message, with the operation).
#[derive(Debug, thiserror::Error)]
#[error("ledger {op}: {reason}")]
pub struct LedgerError {
    op: &'static str,
    reason: String,
}

fn err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> LedgerError {
    move |e| LedgerError {
        op,
        reason: e.to_string(),
    }
}

/// Counts and sums over the ledger, for `gleaner credit` and status (a control API type).
pub use gleaner::control::LedgerTotals;

/// The durable ledger.
pub struct Ledger {
    db: Database,
}

impl Ledger {
    /// Opens (or creates) the ledger file.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err("create dir"))?;
        }
        let db = Database::create(path).map_err(|e| LedgerError {
            op: "open",
            reason: format!("{}: {e}", path.display()),
        })?;
        let txn = db.begin_write().map_err(err("open"))?;
        {
            txn.open_table(PENDING).map_err(err("open"))?;
            txn.open_table(DELIVERED).map_err(err("open"))?;
            txn.open_table(REJECTED).map_err(err("open"))?;
            txn.open_table(MACHINES).map_err(err("open"))?;
        }
        txn.commit().map_err(err("open"))?;
        Ok(Ledger { db })
    }

    fn write(
        &self,
        op: &'static str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), LedgerError> {
        let txn = self.db.begin_write().map_err(err(op))?;
        f(&txn).map_err(err(op))?;
        txn.commit().map_err(err(op))
    }

    /// Appends a signed record to the outbox; durable when this returns.
    pub fn append(&self, record_id: Id16, envelope: &Envelope) -> Result<(), LedgerError> {
        let bytes = envelope.to_bytes();
        self.write("append", |txn| {
            txn.open_table(PENDING)?
                .insert(record_id.0.as_slice(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Records a machine's state (JSON written by the factory) for crash recovery.
    pub fn put_machine(&self, machine_id: Id16, state: &[u8]) -> Result<(), LedgerError> {
        self.write("put machine", |txn| {
            txn.open_table(MACHINES)?
                .insert(machine_id.0.as_slice(), state)?;
            Ok(())
        })
    }

    /// Appends an interim record and updates the machine's state in one transaction.
    pub fn append_interim(
        &self,
        machine_id: Id16,
        state: &[u8],
        record_id: Id16,
        envelope: &Envelope,
    ) -> Result<(), LedgerError> {
        let bytes = envelope.to_bytes();
        self.write("append interim", |txn| {
            txn.open_table(PENDING)?
                .insert(record_id.0.as_slice(), bytes.as_slice())?;
            txn.open_table(MACHINES)?
                .insert(machine_id.0.as_slice(), state)?;
            Ok(())
        })
    }

    /// Appends a machine's final record and forgets the machine, atomically.
    pub fn finish_machine(
        &self,
        machine_id: Id16,
        record_id: Id16,
        envelope: &Envelope,
    ) -> Result<(), LedgerError> {
        let bytes = envelope.to_bytes();
        self.write("finish machine", |txn| {
            txn.open_table(PENDING)?
                .insert(record_id.0.as_slice(), bytes.as_slice())?;
            txn.open_table(MACHINES)?.remove(machine_id.0.as_slice())?;
            Ok(())
        })
    }

    /// Forgets a machine without a record (it never started).
    pub fn remove_machine(&self, machine_id: Id16) -> Result<(), LedgerError> {
        self.write("remove machine", |txn| {
            txn.open_table(MACHINES)?.remove(machine_id.0.as_slice())?;
            Ok(())
        })
    }

    /// Every machine the factory recorded as running, with its state bytes.
    pub fn machines(&self) -> Result<Vec<(Id16, Vec<u8>)>, LedgerError> {
        let txn = self.db.begin_read().map_err(err("read machines"))?;
        let table = txn.open_table(MACHINES).map_err(err("read machines"))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err("read machines"))? {
            let (k, v) = row.map_err(err("read machines"))?;
            out.push((id_of(k.value()), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Up to `max` records waiting for the coordinator, oldest id order.
    pub fn pending(&self, max: usize) -> Result<Vec<(Id16, Vec<u8>)>, LedgerError> {
        let txn = self.db.begin_read().map_err(err("read pending"))?;
        let table = txn.open_table(PENDING).map_err(err("read pending"))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err("read pending"))?.take(max) {
            let (k, v) = row.map_err(err("read pending"))?;
            out.push((id_of(k.value()), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Moves acknowledged records from the outbox to the delivered table.
    pub fn acknowledge(&self, ids: &[Id16]) -> Result<(), LedgerError> {
        self.write("acknowledge", |txn| {
            let mut pending = txn.open_table(PENDING)?;
            let mut delivered = txn.open_table(DELIVERED)?;
            for id in ids {
                let bytes = pending.remove(id.0.as_slice())?.map(|v| v.value().to_vec());
                if let Some(bytes) = bytes {
                    delivered.insert(id.0.as_slice(), bytes.as_slice())?;
                }
            }
            Ok(())
        })
    }

    /// Moves a record the coordinator refused for good out of the outbox, keeping the reason.
    pub fn reject(&self, id: Id16, reason: &str) -> Result<(), LedgerError> {
        self.write("reject", |txn| {
            let mut pending = txn.open_table(PENDING)?;
            let bytes = pending.remove(id.0.as_slice())?.map(|v| v.value().to_vec());
            if let Some(bytes) = bytes {
                txn.open_table(REJECTED)?
                    .insert(id.0.as_slice(), (bytes.as_slice(), reason))?;
            }
            Ok(())
        })
    }

    /// Rejected records with their reasons.
    pub fn rejected(&self) -> Result<Vec<(Id16, String)>, LedgerError> {
        let txn = self.db.begin_read().map_err(err("read rejected"))?;
        let table = txn.open_table(REJECTED).map_err(err("read rejected"))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err("read rejected"))? {
            let (k, v) = row.map_err(err("read rejected"))?;
            out.push((id_of(k.value()), v.value().1.to_owned()));
        }
        Ok(out)
    }

    /// Every usage record in the outbox and delivered tables (decoded; they were signed by us).
    pub fn records(&self) -> Result<Vec<(UsageRecord, bool)>, LedgerError> {
        let txn = self.db.begin_read().map_err(err("read records"))?;
        let mut out = Vec::new();
        for (def, delivered) in [(PENDING, false), (DELIVERED, true)] {
            let table = txn.open_table(def).map_err(err("read records"))?;
            for row in table.iter().map_err(err("read records"))? {
                let (_, v) = row.map_err(err("read records"))?;
                if let Ok(r) = Envelope::open_bytes::<UsageRecord>(v.value()) {
                    out.push((r.message, delivered));
                }
            }
        }
        Ok(out)
    }

    /// Counts and CPU sums.
    pub fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        let mut t = LedgerTotals::default();
        for (r, delivered) in self.records()? {
            t.cpu_ms += r.cpu_ms;
            if delivered {
                t.delivered += 1;
                t.delivered_cpu_ms += r.cpu_ms;
            } else {
                t.pending += 1;
            }
        }
        let txn = self.db.begin_read().map_err(err("totals"))?;
        t.rejected = txn
            .open_table(REJECTED)
            .and_then(|tb| Ok(tb.len()?))
            .map_err(err("totals"))?;
        Ok(t)
    }
}

/// Credit in the local ledger per project and per day (for `gleaner credit` and the GUI's chart):
/// the control API's types. The credit is the formula's at weight 1.0: the machine type's weight is
/// not in the record, so the coordinator's figure is the one that counts.
pub use gleaner::control::{CreditView, DayCredit, ProjectCredit};

impl Ledger {
    /// The totals with the per-project and per-day breakdown.
    pub fn credit(&self) -> Result<CreditView, LedgerError> {
        use std::collections::BTreeMap;
        let mut projects: BTreeMap<(String, String), ProjectCredit> = BTreeMap::new();
        let mut days: BTreeMap<u64, DayCredit> = BTreeMap::new();
        for (r, _) in self.records()? {
            let c = gleaner::credit::credit(&r, 1000).credit;
            let key = (r.publisher.to_string(), r.machine_type.to_string());
            let p = projects
                .entry(key.clone())
                .or_insert_with(|| ProjectCredit {
                    publisher: key.0,
                    machine_type: key.1,
                    ..ProjectCredit::default()
                });
            p.records += 1;
            p.cpu_ms += r.cpu_ms;
            p.credit += c;
            let day = r.end / 86_400;
            let d = days.entry(day).or_insert_with(|| DayCredit {
                day,
                ..DayCredit::default()
            });
            d.cpu_ms += r.cpu_ms;
            d.credit += c;
        }
        Ok(CreditView {
            totals: self.totals()?,
            by_project: projects.into_values().collect(),
            by_day: days.into_values().collect(),
            coordinator: None,
        })
    }
}

fn id_of(bytes: &[u8]) -> Id16 {
    let mut id = [0u8; 16];
    let n = bytes.len().min(16);
    id[..n].copy_from_slice(&bytes[..n]);
    Id16(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::{Digest, OutcomeCode, SecretKey};

    fn env(key: &SecretKey, n: u8) -> (Id16, Envelope) {
        let r = UsageRecord {
            v: 1,
            record_id: Id16([n; 16]),
            host: key.public(),
            machine_id: Id16([9; 16]),
            publisher: key.public(),
            machine_type: Digest([1; 32]),
            start: 100,
            end: 110,
            cpu_ms: 5_000,
            wall_ms: 10_000,
            peak_memory: 1,
            cores: 1,
            benchmark: 1,
            outcome: OutcomeCode::Success,
        };
        (r.record_id, Envelope::seal(&r, key))
    }

    #[test]
    fn outbox_moves_through_acknowledge_and_reject() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([1; 32]);
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        for n in 0..3 {
            let (id, e) = env(&key, n);
            ledger.append(id, &e).unwrap();
        }
        assert_eq!(ledger.pending(10).unwrap().len(), 3);
        ledger.acknowledge(&[Id16([0; 16]), Id16([1; 16])]).unwrap();
        ledger.reject(Id16([2; 16]), "unknown host").unwrap();
        assert!(ledger.pending(10).unwrap().is_empty());
        let t = ledger.totals().unwrap();
        assert_eq!((t.pending, t.delivered, t.rejected), (0, 2, 1));
        assert_eq!(t.delivered_cpu_ms, 10_000);
        assert_eq!(ledger.rejected().unwrap()[0].1, "unknown host");
        // Acknowledging again is harmless.
        ledger.acknowledge(&[Id16([0; 16])]).unwrap();
        assert_eq!(ledger.totals().unwrap().delivered, 2);
    }

    #[test]
    fn credit_per_project_and_per_day() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([1; 32]);
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        for n in 0..3 {
            let (id, e) = env(&key, n);
            ledger.append(id, &e).unwrap();
        }
        let c = ledger.credit().unwrap();
        assert_eq!(c.totals.pending, 3);
        assert_eq!(c.by_project.len(), 1);
        assert_eq!(c.by_project[0].records, 3);
        assert_eq!(c.by_project[0].cpu_ms, 15_000);
        assert_eq!(c.by_day.len(), 1);
        assert_eq!(c.by_day[0].day, 0);
        assert!(c.by_day[0].credit > 0.0);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["pending"], 3, "the totals stay at the top level: {v}");
    }

    #[test]
    fn finishing_a_machine_is_atomic_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let key = SecretKey::from_seed([1; 32]);
        {
            let ledger = Ledger::open(&path).unwrap();
            ledger.put_machine(Id16([9; 16]), b"{}").unwrap();
            assert_eq!(ledger.machines().unwrap().len(), 1);
            let (id, e) = env(&key, 7);
            ledger.finish_machine(Id16([9; 16]), id, &e).unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        assert!(ledger.machines().unwrap().is_empty());
        assert_eq!(ledger.pending(10).unwrap()[0].0, Id16([7; 16]));
    }
}
