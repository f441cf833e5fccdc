//! The outbox: delivers the ledger's pending usage records to the coordinator until each is
//! acknowledged (accepted or already known) or refused for good, retrying with capped exponential
//! back-off. With the coordinator acknowledging only after a durable commit and de-duplicating by
//! record id, this gives exactly-once credit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gleaner::Id16;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;

/// The coordinator's verdict on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stored now.
    Accepted,
    /// Stored before (a retry): also final.
    Duplicate,
    /// Refused for good, with the reason (bad signature, impossible values...).
    Rejected(String),
    /// Not decided this time (e.g. the host is not enrolled yet): keep and retry later.
    Retry(String),
}

/// Why a whole upload failed (nothing was acknowledged; everything is retried).
#[derive(Debug, thiserror::Error)]
#[error("upload to {url} failed: {reason}")]
pub struct UploadError {
    pub url: String,
    pub reason: String,
}

/// Sends a batch of signed record envelopes; one verdict per record, in order.
pub trait Uploader: Send + Sync + 'static {
    fn upload(
        &self,
        batch: &[(Id16, Vec<u8>)],
    ) -> impl Future<Output = Result<Vec<Verdict>, UploadError>> + Send;
}

/// Settings of the delivery loop.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub batch_max: usize,
    /// How often to look for records when nothing wakes the loop.
    pub poll: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            batch_max: 500,
            poll: Duration::from_secs(5),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// What one delivery round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub sent: usize,
    pub acknowledged: usize,
    pub rejected: usize,
    pub retry: usize,
}

/// Delivers one batch; returns what happened.
pub async fn deliver_once<U: Uploader>(
    ledger: &Ledger,
    uploader: &U,
    batch_max: usize,
) -> Result<Round, UploadError> {
    let batch = ledger.pending(batch_max).map_err(|e| UploadError {
        url: "ledger".into(),
        reason: e.to_string(),
    })?;
    if batch.is_empty() {
        return Ok(Round::default());
    }
    let verdicts = uploader.upload(&batch).await?;
    let mut round = Round {
        sent: batch.len(),
        ..Round::default()
    };
    let mut acked = Vec::new();
    for ((id, _), v) in batch.iter().zip(verdicts.iter()) {
        match v {
            Verdict::Accepted | Verdict::Duplicate => acked.push(*id),
            Verdict::Rejected(reason) => {
                tracing::warn!("coordinator refused record {id}: {reason}");
                if let Err(e) = ledger.reject(*id, reason) {
                    tracing::warn!("{e}");
                }
                round.rejected += 1;
            }
            Verdict::Retry(reason) => {
                tracing::info!("record {id} deferred: {reason}");
                round.retry += 1;
            }
        }
    }
    ledger.acknowledge(&acked).map_err(|e| UploadError {
        url: "ledger".into(),
        reason: e.to_string(),
    })?;
    round.acknowledged = acked.len();
    Ok(round)
}

/// Runs delivery until `cancel` fires. `wake` is notified when new records are written.
pub async fn run<U: Uploader>(
    ledger: Arc<Ledger>,
    uploader: U,
    cfg: OutboxConfig,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut backoff = cfg.backoff_min;
    loop {
        let wait = match deliver_once(&ledger, &uploader, cfg.batch_max).await {
            Ok(r) if r.sent > 0 && r.retry < r.sent => {
                backoff = cfg.backoff_min;
                tracing::debug!("delivered {r:?}");
                // More may be waiting: go again at once.
                if r.sent == cfg.batch_max {
                    continue;
                }
                cfg.poll
            }
            Ok(r) if r.retry > 0 => {
                backoff = (backoff * 2).min(cfg.backoff_max);
                backoff
            }
            Ok(_) => cfg.poll,
            Err(e) => {
                tracing::warn!("{e}; retrying in {backoff:?}");
                let w = backoff;
                backoff = (backoff * 2).min(cfg.backoff_max);
                w
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::{Digest, Envelope, OutcomeCode, SecretKey, UsageRecord};
    use std::sync::Mutex;

    /// A coordinator double: fails the first `fail` uploads, then accepts new ids and reports
    /// known ones as duplicates (as the real one de-duplicates).
    struct Flaky {
        fail: Mutex<u32>,
        seen: Mutex<Vec<Id16>>,
    }

    impl Uploader for Flaky {
        async fn upload(&self, batch: &[(Id16, Vec<u8>)]) -> Result<Vec<Verdict>, UploadError> {
            {
                let mut f = self.fail.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(UploadError {
                        url: "test".into(),
                        reason: "connection refused".into(),
                    });
                }
            }
            let mut seen = self.seen.lock().unwrap();
            Ok(batch
                .iter()
                .map(|(id, _)| {
                    if id.0[0] == 0xee {
                        Verdict::Rejected("impossible".into())
                    } else if seen.contains(id) {
                        Verdict::Duplicate
                    } else {
                        seen.push(*id);
                        Verdict::Accepted
                    }
                })
                .collect())
        }
    }

    fn append(ledger: &Ledger, n: u8) {
        let key = SecretKey::from_seed([1; 32]);
        let r = UsageRecord {
            v: 1,
            record_id: Id16([n; 16]),
            host: key.public(),
            machine_id: Id16([1; 16]),
            publisher: key.public(),
            machine_type: Digest([1; 32]),
            start: 0,
            end: 10,
            cpu_ms: 1,
            wall_ms: 10_000,
            peak_memory: 0,
            cores: 1,
            benchmark: 1,
            outcome: OutcomeCode::Success,
        };
        ledger
            .append(r.record_id, &Envelope::seal(&r, &key))
            .unwrap();
    }

    #[tokio::test]
    async fn retries_until_acknowledged_and_drops_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(&dir.path().join("l.redb")).unwrap());
        for n in 1..=5 {
            append(&ledger, n);
        }
        append(&ledger, 0xee);
        let up = Flaky {
            fail: Mutex::new(2),
            seen: Mutex::new(vec![Id16([3; 16])]),
        };
        assert!(deliver_once(&ledger, &up, 2).await.is_err());
        assert!(deliver_once(&ledger, &up, 2).await.is_err());
        assert_eq!(
            ledger.pending(100).unwrap().len(),
            6,
            "nothing lost on failure"
        );
        let mut total = Round::default();
        loop {
            let r = deliver_once(&ledger, &up, 2).await.unwrap();
            if r.sent == 0 {
                break;
            }
            total.acknowledged += r.acknowledged;
            total.rejected += r.rejected;
        }
        assert_eq!((total.acknowledged, total.rejected), (5, 1));
        let t = ledger.totals().unwrap();
        assert_eq!((t.pending, t.delivered, t.rejected), (0, 5, 1));
        // Each record reached the coordinator's store once.
        assert_eq!(up.seen.lock().unwrap().len(), 5);
    }
}
