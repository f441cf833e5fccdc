//! Machine types fetched from their HTTPS URLs (`type_urls` / `--type-url`): polled with
//! conditional GETs, size-limited, and admitted exactly as the folder's types are (signature,
//! expiry, trusted publisher, no rollback), then served to the space.
//!
//! The signature, not the connection, is what makes a type trustworthy: TLS keeps what a host runs
//! private and stops a stranger serving junk, and a URL may pin its server's certificate by
//! SHA-256 (`#fingerprint=…`, as the embedded coordinator prints it) where there is no public
//! certificate authority. A failing URL is retried with back-off and said once per distinct
//! failure in `gleaner events`; the last good copy stays offered meanwhile.

use std::sync::Arc;
use std::time::Duration;

use gleaner::Digest;
use reqwest::Url;
use reqwest::header::{
    ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use tokio_util::sync::CancellationToken;

use crate::coordinator_client::causes;
use crate::factory::FactoryHandle;
use crate::trust::{Catalogue, say};

/// A signed machine type fetched from a URL is this large at most (as a file in the folder).
pub const TYPE_BODY_MAX: usize = 256 * 1024;
/// How often each URL is asked for a new version unless the settings say otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(15 * 60);
/// The shortest poll the settings may ask for.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// A failing URL is asked again after this, doubling each time, up to the poll interval.
const RETRY_FIRST: Duration = Duration::from_secs(10);
/// How often held copies are offered to admission again (a publisher trusted since is then
/// admitted within this long, without waiting for the next poll).
const TICK: Duration = Duration::from_secs(1);

/// One machine-type URL, with the pinned certificate if it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeUrl {
    pub url: Url,
    /// SHA-256 of the server's certificate (DER); `None`: the system's certificate authorities.
    pub pin: Option<Digest>,
}

impl std::fmt::Display for TypeUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.url)
    }
}

impl TypeUrl {
    /// `https://host[:port]/path[?query][#fingerprint=SHA256-HEX]`. The hex may have colons.
    pub fn parse(s: &str) -> Result<TypeUrl, String> {
        let s = s.trim();
        let (base, fragment) = match s.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (s, None),
        };
        let pin = match fragment {
            None => None,
            Some(f) => {
                let hex = f.strip_prefix("fingerprint=").ok_or_else(|| {
                    format!(
                        "{s:?}: the only fragment understood is #fingerprint=<the server \
                         certificate's SHA-256 in hex>"
                    )
                })?;
                Some(hex.replace(':', "").parse::<Digest>().map_err(|_| {
                    format!("{s:?}: the fingerprint {hex:?} is not a SHA-256 in hex")
                })?)
            }
        };
        let url = Url::parse(base).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if url.scheme() != "https" {
            return Err(format!(
                "{s:?}: machine types are fetched over https:// only (the scheme here is {:?})",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{s:?} names no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{s:?}: credentials in the URL would be written to logs; serve the type publicly \
                 (it is signed) or pin the server's certificate"
            ));
        }
        Ok(TypeUrl { url, pin })
    }
}

/// What a conditional GET came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// 304: the copy held is current.
    Unchanged,
    /// A new body, and the validators to send next time.
    Body {
        bytes: Vec<u8>,
        validators: Validators,
    },
}

/// The response's `ETag` and `Last-Modified`, sent back as `If-None-Match` and
/// `If-Modified-Since` so that an unchanged type costs the server a 304.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
}

/// Why a URL gave no machine type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Client(String),
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("larger than {TYPE_BODY_MAX} bytes: not a signed machine type")]
    TooLarge,
}

/// One conditional GET of `url`, reading at most [`TYPE_BODY_MAX`] bytes of body.
pub async fn fetch(
    client: &reqwest::Client,
    url: &Url,
    held: &Validators,
) -> Result<Fetched, FetchError> {
    let mut headers = HeaderMap::new();
    if let Some(v) = &held.etag {
        headers.insert(IF_NONE_MATCH, v.clone());
    }
    if let Some(v) = &held.last_modified {
        headers.insert(IF_MODIFIED_SINCE, v.clone());
    }
    let mut resp = client
        .get(url.clone())
        .headers(headers)
        .send()
        .await
        .map_err(|e| FetchError::Transport(causes(&e)))?;
    if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::Unchanged);
    }
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > TYPE_BODY_MAX as u64)
    {
        return Err(FetchError::TooLarge);
    }
    let validators = Validators {
        etag: resp.headers().get(ETAG).cloned(),
        last_modified: resp.headers().get(LAST_MODIFIED).cloned(),
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Transport(causes(&e)))?
    {
        if bytes.len() + chunk.len() > TYPE_BODY_MAX {
            return Err(FetchError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched::Body { bytes, validators })
}

/// One URL's state between polls.
struct Feed {
    url: TypeUrl,
    client: Option<reqwest::Client>,
    validators: Validators,
    /// The last body fetched, offered to admission every tick (admission looks at each digest
    /// once, until trust changes).
    body: Option<Vec<u8>>,
    due: tokio::time::Instant,
    failures: u32,
    /// The failure last said, so that a URL down for a day is said once, not every retry.
    said: Option<String>,
}

/// The wait after `failures` failures in a row: [`RETRY_FIRST`] doubling, at most `every`.
pub fn retry_after(failures: u32, every: Duration) -> Duration {
    let doubled = RETRY_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(every)
}

impl Feed {
    /// Asks the URL once; `at` is the tick this poll belongs to, which the next is timed from.
    async fn poll(&mut self, at: tokio::time::Instant, every: Duration, factory: &FactoryHandle) {
        let client = match &self.client {
            Some(c) => Ok(c.clone()),
            None => crate::pinning::http_client(self.url.pin).map_err(FetchError::Client),
        };
        let result = match client {
            Ok(c) => {
                self.client = Some(c.clone());
                fetch(&c, &self.url.url, &self.validators).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(fetched) => {
                if self.said.take().is_some() {
                    say(
                        factory,
                        false,
                        format!("machine type URL {} answers again", self.url),
                    )
                    .await;
                }
                self.failures = 0;
                self.due = at + every;
                if let Fetched::Body { bytes, validators } = fetched {
                    if self.body.as_deref() != Some(&bytes[..]) {
                        tracing::info!(
                            "fetched {}: {} bytes, digest {}",
                            self.url,
                            bytes.len(),
                            Digest::of(&bytes)
                        );
                    }
                    self.body = Some(bytes);
                    self.validators = validators;
                }
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                let wait = retry_after(self.failures, every);
                self.due = at + wait;
                let what = e.to_string();
                if self.said.as_deref() != Some(&what) {
                    let kept = if self.body.is_some() {
                        "; the copy fetched before stays offered"
                    } else {
                        ""
                    };
                    say(
                        factory,
                        true,
                        format!(
                            "machine type URL {}: {what}; asking again in {} s{kept}",
                            self.url,
                            wait.as_secs()
                        ),
                    )
                    .await;
                    self.said = Some(what);
                }
            }
        }
    }
}

/// Polls every URL until `cancel`: those due at once, then offers what each last gave to admission
/// (the trust store's checks, shown in `gleaner events` when refused); what is admitted for the
/// first time is served to the space.
pub async fn run(
    urls: Vec<TypeUrl>,
    every: Duration,
    catalogue: Arc<tokio::sync::Mutex<Catalogue>>,
    factory: FactoryHandle,
    space: Option<crate::p2p::SpaceHandle>,
    cancel: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    let mut feeds: Vec<Feed> = urls
        .into_iter()
        .map(|url| Feed {
            url,
            client: None,
            validators: Validators::default(),
            body: None,
            due: start,
            failures: 0,
            said: None,
        })
        .collect();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let at = tokio::select! {
            _ = cancel.cancelled() => return,
            at = tick.tick() => at,
        };
        // The URLs due are asked at once: one slow server does not hold up the others.
        let due = feeds
            .iter_mut()
            .filter(|f| f.due <= at)
            .map(|f| f.poll(at, every, &factory));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = futures_util::future::join_all(due) => {}
        }
        for feed in &feeds {
            let Some(body) = &feed.body else { continue };
            let now = crate::factory::now_ms() / 1000;
            let origin = feed.url.to_string();
            let admitted = catalogue
                .lock()
                .await
                .admit_signed(body, &origin, now, &factory)
                .await;
            if admitted.is_some()
                && let Some(space) = &space
                && let Err(e) = space.provide(body.clone()).await
            {
                tracing::warn!("not serving {origin}'s machine type to the space: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_with_an_optional_pin() {
        let pin = "ab".repeat(32);
        let u = TypeUrl::parse(&format!(
            "https://types.example.org/w.gmt#fingerprint={pin}"
        ))
        .unwrap();
        assert_eq!(u.url.as_str(), "https://types.example.org/w.gmt");
        assert_eq!(u.pin, Some(pin.parse().unwrap()));
        assert_eq!(u.to_string(), "https://types.example.org/w.gmt");
        // Colons, as openssl prints fingerprints.
        let colons = pin
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        let c = TypeUrl::parse(&format!("https://h/w.gmt#fingerprint={colons}")).unwrap();
        assert_eq!(c.pin, u.pin);
        assert_eq!(TypeUrl::parse("https://h:8443/a/w.gmt").unwrap().pin, None);

        let e = TypeUrl::parse("http://h/w.gmt").unwrap_err();
        assert!(e.contains("https:// only"), "{e}");
        let e = TypeUrl::parse("https://h/w.gmt#sha=1").unwrap_err();
        assert!(e.contains("#fingerprint="), "{e}");
        let e = TypeUrl::parse("https://h/w.gmt#fingerprint=xyz").unwrap_err();
        assert!(e.contains("not a SHA-256"), "{e}");
        let e = TypeUrl::parse("https://user:pw@h/w.gmt").unwrap_err();
        assert!(e.contains("credentials"), "{e}");
        let e = TypeUrl::parse("types.example.org/w.gmt").unwrap_err();
        assert!(e.contains("not a URL"), "{e}");
    }

    #[test]
    fn retries_back_off_up_to_the_poll_interval() {
        let every = Duration::from_secs(900);
        assert_eq!(retry_after(1, every), Duration::from_secs(10));
        assert_eq!(retry_after(2, every), Duration::from_secs(20));
        assert_eq!(retry_after(4, every), Duration::from_secs(80));
        assert_eq!(retry_after(10, every), every);
        assert_eq!(retry_after(u32::MAX, every), every);
        // A short poll (a test's) is never exceeded.
        assert_eq!(
            retry_after(1, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
