//! The HTTP API and pages: ingest of signed usage batches, enrolment, machine-type registration,
//! the dashboard, JSON stats, Prometheus metrics and health. One error type decides what clients see.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use gleaner::cbor::{self, Limits};
use gleaner::enrolment::Enrolment;
use gleaner::envelope::open_batch_messages;
use gleaner::{Envelope, MachineType, UsageRecord};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::dashboard;
use crate::ratelimit::{self, Limiter, RateLimits};
use crate::space::SpaceSnapshot;
use crate::store::{IngestTiming, Outcome, Store, StoreError};

/// Addresses tracked by each rate limiter before idle ones are dropped.
const RATE_LIMIT_CLIENTS: usize = 100_000;

/// Shared state of the server.
pub struct AppState {
    pub store: Store,
    /// What enrolments must name as their coordinator (the certificate fingerprint).
    pub identity: String,
    pub metrics: Metrics,
    pub limiters: Limiters,
    /// The live view of the space when the coordinator joined one (`serve --space`).
    pub space: Option<tokio::sync::watch::Receiver<SpaceSnapshot>>,
    /// Batches being verified at once: one per core, first come first served, so a burst of
    /// batches does not time-slice every one of them (and the HTTP workers) into slow answers.
    verifiers: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// State with fresh metrics and the given rate limits.
    pub fn new(store: Store, identity: String, limits: RateLimits) -> AppState {
        AppState {
            store,
            identity,
            metrics: Metrics::default(),
            limiters: Limiters::new(limits),
            space: None,
            verifiers: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            )),
        }
    }

    /// The same state, showing the space whose snapshots `space` delivers.
    pub fn with_space(mut self, space: tokio::sync::watch::Receiver<SpaceSnapshot>) -> AppState {
        // Registered only now, so that a coordinator outside any space exports no zeros.
        self.metrics.space.register(&mut self.metrics.registry);
        self.space = Some(space);
        self
    }

    /// The latest snapshot of the space, if the coordinator joined one.
    pub fn space_snapshot(&self) -> Option<SpaceSnapshot> {
        self.space.as_ref().map(|rx| rx.borrow().clone())
    }
}

/// The per-client rate limiters of the limited routes (kept in the state so that they outlive any
/// one router).
#[derive(Debug, Clone)]
pub struct Limiters {
    pub ingest: Arc<Limiter>,
    pub enrol: Arc<Limiter>,
}

impl Limiters {
    pub fn new(limits: RateLimits) -> Limiters {
        Limiters {
            ingest: Arc::new(Limiter::new(limits.ingest, RATE_LIMIT_CLIENTS)),
            enrol: Arc::new(Limiter::new(limits.enrol, RATE_LIMIT_CLIENTS)),
        }
    }
}

/// Counters exported at /metrics.
pub struct Metrics {
    registry: Registry,
    pub accepted: Counter,
    pub duplicate: Counter,
    pub rejected: Counter,
    pub retry: Counter,
    pub batches: Counter,
    pub space: SpaceGauges,
}

/// Gauges of the live space (set from the latest snapshot when /metrics is read; absent from the
/// output while the coordinator has not joined a space).
#[derive(Default)]
pub struct SpaceGauges {
    pub peers: Gauge,
    pub connected: Gauge,
    pub free_cores: Gauge,
    pub free_memory_mib: Gauge,
    pub running_machines: Gauge,
    pub owner_present: Gauge,
    pub draining: Gauge,
}

impl SpaceGauges {
    fn register(&self, r: &mut Registry) {
        for (name, help, g) in [
            (
                "space_peers",
                "factories with a live capacity advert",
                &self.peers,
            ),
            (
                "space_connected",
                "libp2p connections to the space",
                &self.connected,
            ),
            (
                "space_free_cores",
                "free cores advertised across the space",
                &self.free_cores,
            ),
            (
                "space_free_memory_mib",
                "free memory advertised across the space, MiB",
                &self.free_memory_mib,
            ),
            (
                "space_running_machines",
                "machines running across the space",
                &self.running_machines,
            ),
            (
                "space_owner_present",
                "factories whose owner is at the machine",
                &self.owner_present,
            ),
            ("space_draining", "factories draining", &self.draining),
        ] {
            r.register(name, help, g.clone());
        }
    }

    fn set(&self, s: &SpaceSnapshot) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.peers.set(g(s.totals.peers));
        self.connected.set(g(s.connected));
        self.free_cores.set(g(s.totals.free_cores));
        self.free_memory_mib.set(g(s.totals.free_memory_mib));
        self.running_machines.set(g(s.totals.running_machines));
        self.owner_present.set(g(s.totals.owner_present));
        self.draining.set(g(s.totals.draining));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gleaner_coordinator");
        let m = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let accepted = m(&mut registry, "records_accepted", "usage records stored");
        let duplicate = m(
            &mut registry,
            "records_duplicate",
            "usage records already stored",
        );
        let rejected = m(
            &mut registry,
            "records_rejected",
            "usage records refused for good",
        );
        let retry = m(
            &mut registry,
            "records_retry",
            "usage records deferred (host not enrolled)",
        );
        let batches = m(&mut registry, "batches", "usage batches committed");
        Metrics {
            registry,
            accepted,
            duplicate,
            rejected,
            retry,
            batches,
            space: SpaceGauges::default(),
        }
    }
}

/// What a client sees when a request fails.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    NotFoundBecause(String),
    #[error("internal error")]
    Store(#[from] StoreError),
    #[error("internal error")]
    Internal(String),
    #[error("too many requests from this address; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::NotFoundBecause(_) => StatusCode::NOT_FOUND,
            ApiError::Store(e) => {
                tracing::error!("{e}");
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(e) => {
                tracing::error!("{e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut resp = (
            code,
            axum::Json(serde_json::json!({"error": self.to_string()})),
        )
            .into_response();
        if let ApiError::RateLimited { retry_after } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after));
        }
        resp
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The per-record answer to a usage batch.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResponse {
    pub results: Vec<serde_json::Value>,
}

/// A slot per envelope (None when the record goes on to the store, else why it was refused) and
/// the verified records in order.
type Opened = (Vec<Option<Outcome>>, Vec<UsageRecord>);

/// Decodes a posted batch and verifies it.
fn verify_batch(body: &[u8]) -> Result<Opened, ApiError> {
    let envelopes: Vec<Envelope> = cbor::from_slice(body, &Limits::BATCH, "usage batch")
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let opened = open_batch_messages::<UsageRecord>(&envelopes);
    let mut results: Vec<Option<Outcome>> = Vec::with_capacity(opened.len());
    let mut good = Vec::with_capacity(opened.len());
    for r in opened {
        match r {
            Ok((_, record)) => {
                good.push(record);
                results.push(None);
            }
            Err(e) => results.push(Some(Outcome::Rejected {
                reason: e.to_string(),
            })),
        }
    }
    Ok((results, good))
}

/// When a request's headers arrived (set by [`stamp`]), to tell body reading from the rest.
#[derive(Debug, Clone, Copy)]
struct Arrived(Instant);

async fn stamp(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    req.extensions_mut().insert(Arrived(Instant::now()));
    next.run(req).await
}

/// The `Server-Timing` value (milliseconds) of an ingest answer: body read, verification (with
/// its wait for a free core), waiting for a writer, the group's transaction up to COMMIT's return
/// (durable on PostgreSQL), SQLite's sync of the write-ahead log after it, and the total.
fn server_timing(body: Duration, verify: Duration, store: IngestTiming, total: Duration) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "body;dur={:.3}, verify;dur={:.3}, queue;dur={:.3}, commit;dur={:.3}, sync;dur={:.3}, \
         total;dur={:.3}",
        ms(body),
        ms(verify),
        ms(store.queued),
        ms(store.commit),
        ms(store.sync),
        ms(total)
    )
}

async fn ingest(
    State(st): State<Arc<AppState>>,
    arrived: Option<axum::Extension<Arrived>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let arrived = arrived.map_or(start, |a| a.0.0);
    // Decoding and signature verification are CPU work: off the async workers, one batch per core.
    let permit = st
        .verifiers
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::Internal(format!("verification slots: {e}")))?;
    let (results, good) = tokio::task::spawn_blocking(move || {
        let opened = verify_batch(&body);
        drop(permit);
        opened
    })
    .await
    .map_err(|e| ApiError::Internal(format!("verification task: {e}")))??;
    let verified = Instant::now();
    let stored = st.store.ingest_timed(good, now()).await?;
    st.metrics.batches.inc();
    let timing = stored.timing;
    let mut stored = stored.outcomes.into_iter();
    let results = results
        .into_iter()
        .map(|r| {
            r.or_else(|| stored.next()).unwrap_or(Outcome::Retry {
                reason: "internal".into(),
            })
        })
        .map(|o| {
            match &o {
                Outcome::Accepted => st.metrics.accepted.inc(),
                Outcome::Duplicate => st.metrics.duplicate.inc(),
                Outcome::Rejected { .. } => st.metrics.rejected.inc(),
                Outcome::Retry { .. } => st.metrics.retry.inc(),
            };
            serde_json::to_value(o).unwrap_or_default()
        })
        .collect();
    let mut resp = axum::Json(BatchResponse { results }).into_response();
    let timing = server_timing(
        start.saturating_duration_since(arrived),
        verified - start,
        timing,
        arrived.elapsed(),
    );
    if let Ok(v) = header::HeaderValue::from_str(&timing) {
        resp.headers_mut()
            .insert(header::HeaderName::from_static("server-timing"), v);
    }
    Ok(resp)
}

/// The enrolment request body.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnrolRequest {
    pub account: String,
    pub token: String,
    /// Hex of the signed `Enrolment` envelope.
    pub envelope: String,
}

async fn enrol(
    State(st): State<Arc<AppState>>,
    axum::Json(req): axum::Json<EnrolRequest>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let bytes = hex::decode(&req.envelope)
        .map_err(|e| ApiError::BadRequest(format!("envelope is not hex: {e}")))?;
    let v = Envelope::open_bytes::<Enrolment>(&bytes)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    v.message
        .check_for(&st.identity, &req.account, now())
        .map_err(|e| ApiError::Forbidden(e.to_string()))?;
    if !st.store.check_token(&req.account, &req.token).await? {
        return Err(ApiError::Forbidden(format!(
            "wrong enrolment token for account {:?}",
            req.account
        )));
    }
    st.store.enrol(&v.signer, &req.account, now()).await?;
    Ok(axum::Json(
        serde_json::json!({"host": v.signer.to_string(), "account": req.account}),
    ))
}

async fn register_machine_type(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let v = Envelope::open_bytes::<MachineType>(&body)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    st.store
        .add_machine_type(&v.digest.to_string(), &v.message)
        .await?;
    Ok(axum::Json(
        serde_json::json!({"digest": v.digest.to_string(), "name": v.message.name}),
    ))
}

async fn index(State(st): State<Arc<AppState>>) -> Result<Html<String>, ApiError> {
    Ok(Html(dashboard::index(
        &st.store.stats().await?,
        st.space_snapshot().as_ref(),
    )))
}

const NO_SPACE: &str = "this coordinator has not joined a space (serve --space NAME)";

async fn space_page(State(st): State<Arc<AppState>>) -> Result<Html<String>, ApiError> {
    let s = st
        .space_snapshot()
        .ok_or_else(|| ApiError::NotFoundBecause(NO_SPACE.into()))?;
    Ok(Html(dashboard::space(
        &s,
        &st.store.machine_type_names().await?,
    )))
}

async fn space_json(
    State(st): State<Arc<AppState>>,
) -> Result<axum::Json<SpaceSnapshot>, ApiError> {
    let s = st
        .space_snapshot()
        .ok_or_else(|| ApiError::NotFoundBecause(NO_SPACE.into()))?;
    Ok(axum::Json(s))
}

async fn stats(
    State(st): State<Arc<AppState>>,
) -> Result<axum::Json<crate::store::Stats>, ApiError> {
    Ok(axum::Json(st.store.stats().await?))
}

async fn host(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Html<String>, ApiError> {
    let days = st.store.host_days(&id).await?;
    if days.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(Html(dashboard::host(&id, &days)))
}

async fn project(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Html<String>, ApiError> {
    let p = st.store.project(&id).await?.ok_or(ApiError::NotFound)?;
    Ok(Html(dashboard::project(&p)))
}

async fn project_json(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<crate::store::ProjectHistory>, ApiError> {
    Ok(axum::Json(
        st.store.project(&id).await?.ok_or(ApiError::NotFound)?,
    ))
}

async fn host_json(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<crate::store::HostHistory>, ApiError> {
    Ok(axum::Json(
        st.store.host(&id).await?.ok_or(ApiError::NotFound)?,
    ))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    if let Some(s) = st.space_snapshot() {
        st.metrics.space.set(&s);
    }
    let mut out = String::new();
    if encode(&mut out, &st.metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }

    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The coordinator's routes (drive it in tests with tower's `oneshot`, no socket needed). Serve it
/// with `into_make_service_with_connect_info::<SocketAddr>()` so that rate limits are per client.
pub fn app(state: Arc<AppState>) -> Router {
    let limited =
        |l: &Arc<Limiter>| axum::middleware::from_fn_with_state(l.clone(), ratelimit::limit);
    Router::new()
        .route("/", get(index))
        .route("/host/{id}", get(host))
        .route("/project/{id}", get(project))
        .route("/space", get(space_page))
        .route("/api/space", get(space_json))
        .route(
            "/api/v1/usage",
            post(ingest)
                .route_layer(limited(&state.limiters.ingest))
                .route_layer(axum::middleware::from_fn(stamp)),
        )
        .route(
            "/api/v1/enrol",
            post(enrol).route_layer(limited(&state.limiters.enrol)),
        )
        .route("/api/v1/machine-types", post(register_machine_type))
        .route("/api/v1/project/{id}", get(project_json))
        .route("/api/v1/host/{id}", get(host_json))
        .route("/api/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(Limits::BATCH.max_size))
        .with_state(state)
}
