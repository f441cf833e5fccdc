//! The client's side of the coordinator API (docs/coordinator-api.md): posting batches of signed
//! usage records over HTTPS (pinned certificate) and reading the per-record verdicts.

use gleaner::{Digest, Envelope, Id16, SecretKey};
use serde::Deserialize;

use crate::outbox::{UploadError, Uploader, Verdict};

/// Posts usage batches to a coordinator.
pub struct HttpUploader {
    base: String,
    http: reqwest::Client,
    /// The host key (kept for enrolment requests made by the same client).
    pub key: SecretKey,
}

#[derive(Debug, Deserialize)]
struct BatchResponse {
    results: Vec<RecordResult>,
}

#[derive(Debug, Deserialize)]
struct RecordResult {
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

impl HttpUploader {
    /// A client for the coordinator at `base` (e.g. `https://127.0.0.1:8443`), trusting exactly the
    /// certificate with SHA-256 `pin` when given.
    pub fn new(base: &str, pin: Option<Digest>, key: SecretKey) -> Result<HttpUploader, String> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(format!("coordinator url {base:?} must start with https://"));
        }
        Ok(HttpUploader {
            base,
            http: crate::pinning::http_client(pin)?,
            key,
        })
    }

    /// The HTTP client (pinned), for other coordinator calls.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn base(&self) -> &str {
        &self.base
    }
}

impl Uploader for HttpUploader {
    async fn upload(&self, batch: &[(Id16, Vec<u8>)]) -> Result<Vec<Verdict>, UploadError> {
        let url = format!("{}/api/v1/usage", self.base);
        let err = |reason: String| UploadError {
            url: url.clone(),
            reason,
        };
        let mut envelopes = Vec::with_capacity(batch.len());
        for (_, bytes) in batch {
            envelopes.push(Envelope::from_bytes(bytes).map_err(|e| err(e.to_string()))?);
        }
        let body = gleaner::cbor::to_vec(&envelopes);
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/cbor")
            .body(body)
            .send()
            .await
            .map_err(|e| err(format!("{e:#}")))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            return Err(err(format!(
                "{status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let parsed: BatchResponse =
            serde_json::from_str(&text).map_err(|e| err(format!("unreadable answer: {e}")))?;
        if parsed.results.len() != batch.len() {
            return Err(err(format!(
                "{} verdicts for {} records",
                parsed.results.len(),
                batch.len()
            )));
        }
        Ok(parsed
            .results
            .into_iter()
            .map(|r| match r.status.as_str() {
                "accepted" => Verdict::Accepted,
                "duplicate" => Verdict::Duplicate,
                "rejected" => Verdict::Rejected(r.reason.unwrap_or_else(|| "rejected".into())),
                other => Verdict::Retry(r.reason.unwrap_or_else(|| other.to_owned())),
            })
            .collect())
    }
}

impl HttpUploader {
    /// Enrols this host with `account` using the account's token: a signed proof of possession of
    /// the host key, bound to this coordinator's `identity` (its certificate fingerprint).
    pub async fn enrol(
        &self,
        account: &str,
        token: &str,
        identity: &str,
        now: u64,
    ) -> Result<(), String> {
        let e = gleaner::enrolment::Enrolment {
            v: gleaner::enrolment::ENROLMENT_VERSION,
            host: self.key.public(),
            account: account.to_owned(),
            coordinator: identity.to_owned(),
            at: now,
        };
        let body = serde_json::json!({
            "account": account,
            "token": token,
            "envelope": hex::encode(Envelope::seal(&e, &self.key).to_bytes()),
        });
        let url = format!("{}/api/v1/enrol", self.base);
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("{url}: {e:#}"))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(format!(
            "{url}: {status}: {}",
            text.chars().take(300).collect::<String>()
        ))
    }

    /// Registers a signed machine type so the coordinator knows its name and weight.
    pub async fn register_machine_type(&self, envelope: &[u8]) -> Result<(), String> {
        let url = format!("{}/api/v1/machine-types", self.base);
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/cbor")
            .body(envelope.to_vec())
            .send()
            .await
            .map_err(|e| format!("{url}: {e:#}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url}: {}", resp.status()))
        }
    }
}

/// An error with its causes ("connection refused" is in a source, not the top message).
pub(crate) fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !msg.contains(&s_text) {
            msg.push_str(": ");
            msg.push_str(&s_text);
        }
        src = s.source();
    }
    msg
}

/// This host's credit as the coordinator counts it (`GET /api/v1/host/{id}`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct HostCredit {
    pub credit: f64,
    pub cpu_hours: f64,
    pub records: i64,
    #[serde(default)]
    pub account: Option<String>,
}

/// The coordinator's view of this host's credit, for `gleaner credit`.
pub trait CoordinatorCredit: Send + Sync + std::fmt::Debug + 'static {
    /// Where the coordinator is (for people).
    fn url(&self) -> &str;
    /// The host's credit; `Ok(None)` when the coordinator knows nothing of it yet.
    fn host_credit<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<HostCredit>, String>> + Send + 'a>,
    >;
}

/// Asks the coordinator over HTTPS (pinned certificate), with a short deadline so that
/// `gleaner credit` answers promptly when it is down.
#[derive(Debug, Clone)]
pub struct HttpCoordinatorCredit {
    base: String,
    http: reqwest::Client,
    timeout: std::time::Duration,
}

impl HttpCoordinatorCredit {
    pub fn new(base: &str, pin: Option<Digest>) -> Result<HttpCoordinatorCredit, String> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(format!("coordinator url {base:?} must start with https://"));
        }
        Ok(HttpCoordinatorCredit {
            base,
            http: crate::pinning::http_client(pin)?,
            timeout: std::time::Duration::from_secs(5),
        })
    }
}

impl CoordinatorCredit for HttpCoordinatorCredit {
    fn url(&self) -> &str {
        &self.base
    }

    fn host_credit<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<HostCredit>, String>> + Send + 'a>,
    > {
        Box::pin(async move {
            let url = format!("{}/api/v1/host/{host}", self.base);
            let resp = self
                .http
                .get(&url)
                .timeout(self.timeout)
                .send()
                .await
                .map_err(|e| format!("{url}: {}", causes(&e)))?;
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
            if !status.is_success() {
                return Err(format!(
                    "{url}: {status}: {}",
                    text.chars().take(200).collect::<String>()
                ));
            }
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{url}: unreadable answer: {e}"))
        })
    }
}
