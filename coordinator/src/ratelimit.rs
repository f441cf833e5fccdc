//! Per-client request rate limits: a token bucket per peer address (IPv6 by /64), in a bounded map,
//! answering 429 with Retry-After when a client is over its rate.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;

/// How many requests a client may make: `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub per_second: f64,
    pub burst: u32,
}

impl Quota {
    /// A quota that never refuses (benchmarks, trusted deployments behind a proxy that limits).
    pub const UNLIMITED: Quota = Quota {
        per_second: f64::INFINITY,
        burst: u32::MAX,
    };
}

/// The quotas of the rate-limited routes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// POST /api/v1/usage: a client's ledger flushes a few batches at a time, then waits.
    pub ingest: Quota,
    /// POST /api/v1/enrol: a host enrols once; a burst allows for typos of the token.
    pub enrol: Quota,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            ingest: Quota {
                per_second: 20.0,
                burst: 60,
            },
            enrol: Quota {
                per_second: 0.2,
                burst: 5,
            },
        }
    }
}

impl RateLimits {
    /// No limits at all.
    pub const UNLIMITED: RateLimits = RateLimits {
        ingest: Quota::UNLIMITED,
        enrol: Quota::UNLIMITED,
    };
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by client address. The map is bounded: when it is full, buckets that have
/// refilled completely (idle clients) are dropped, and if none has, new clients share one overflow
/// bucket rather than growing the map.
#[derive(Debug)]
pub struct Limiter {
    quota: Quota,
    max_clients: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The address that stands for every client while the map is full of active ones.
const OVERFLOW: IpAddr = IpAddr::V4(Ipv4Addr::BROADCAST);

impl Limiter {
    /// A limiter tracking at most `max_clients` addresses.
    pub fn new(quota: Quota, max_clients: usize) -> Limiter {
        Limiter {
            quota,
            max_clients: max_clients.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip` at `now`, or says how long until one is available.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.quota.per_second.is_infinite() {
            return Ok(());
        }
        let key = client_key(ip);
        let burst = f64::from(self.quota.burst.max(1));
        let rate = self.quota.per_second.max(1e-6);
        let refill = |b: &Bucket| {
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst)
        };
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let key = if map.contains_key(&key) || map.len() < self.max_clients {
            key
        } else {
            map.retain(|_, b| refill(b) < burst);
            if map.len() < self.max_clients {
                key
            } else {
                OVERFLOW
            }
        };
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(b);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *b = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }

    /// How many addresses are tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// One bucket per IPv4 address, and per /64 for IPv6 (a single host usually holds a whole /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Middleware: refuses a request over its client's quota with 429 and Retry-After (whole seconds,
/// rounded up). The peer address comes from the connection; a request without one (a test driving
/// the router directly) counts as the unspecified address.
pub async fn limit(State(limiter): State<Arc<Limiter>>, req: Request, next: Next) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    match limiter.check(ip, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_says_when() {
        let l = Limiter::new(
            Quota {
                per_second: 2.0,
                burst: 3,
            },
            10,
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(ip, t0).is_ok());
        }
        let wait = l.check(ip, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another client is not affected.
        assert!(l.check("10.0.0.2".parse().unwrap(), t0).is_ok());
        assert!(l.check(ip, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn map_stays_bounded() {
        let q = Quota {
            per_second: 1.0,
            burst: 1,
        };
        let l = Limiter::new(q, 4);
        let t0 = Instant::now();
        for i in 0..100u8 {
            let _ = l.check(IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), t0);
        }
        assert!(l.tracked() <= 5, "{}", l.tracked());
        // Much later every bucket has refilled; new clients get their own again.
        let later = t0 + Duration::from_secs(10);
        assert!(l.check("10.9.9.9".parse().unwrap(), later).is_ok());
        assert!(l.tracked() <= 5);
    }

    #[test]
    fn ipv6_by_prefix() {
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            client_key("2001:db8:1:2:bbbb::9".parse().unwrap())
        );
        assert_eq!(
            client_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
