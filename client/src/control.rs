//! The daemon's local control API: newline-delimited JSON over a Unix socket that only root, the
//! daemon's own user and the `gleaner` group may use (checked twice: by the socket file's mode and
//! group, and by the caller's kernel-reported credentials), with a streaming watch of state.
//!
//! Optionally it also listens on a loopback TCP address (`[control] tcp`), where every request
//! carries the token from `<state_dir>/control.token` (readable like the socket: owner and the
//! `gleaner` group), compared in constant time; a wrong or missing token is refused and logged.
//!
//! The server is generic over a [`Controller`] (the daemon implements it; tests use their own), and
//! [`ControlClient`] is what the CLI, the GUI and the batch-system hooks use.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Machines, usage, owner state and why, limits, space summary.
    Status,
    /// Freeze work now (all, or one machine type by name) for `minutes` or until resumed.
    Pause {
        #[serde(default)]
        minutes: Option<u64>,
        #[serde(default)]
        machine_type: Option<String>,
    },
    /// Thaw what a pause froze.
    Resume {
        #[serde(default)]
        machine_type: Option<String>,
    },
    /// Re-read the settings file: the owner policy changes live; a bad file changes nothing.
    Reload,
    /// The owner's limits: show (no `set`) or change (validated, persisted, applied live).
    Limits {
        #[serde(default)]
        set: Option<serde_json::Value>,
    },
    /// Trust a publisher (by id, or by the hex of a signed machine-type file) with a share.
    /// Policy fields left out default to off (by id) or to what the machine type needs (by file).
    Trust {
        publisher: Option<String>,
        #[serde(default)]
        machine_type_hex: Option<String>,
        #[serde(default)]
        share: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow_vms: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow_egress: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_cores: Option<u16>,
    },
    /// Stop trusting a publisher: nothing new of theirs starts; running machines stop gracefully.
    Untrust {
        publisher: String,
    },
    /// The trust store: trusted publishers with their policy, removals, rotations, revocations.
    Trusted,
    /// Credit earned: the local ledger (and the coordinator's view when reachable).
    Credit,
    /// Stop starting machines; running ones finish by their shutdowntime (`now`: bring it forward).
    Drain {
        #[serde(default)]
        now: bool,
    },
    Undrain,
    /// Recent events.
    Events,
    /// The live view of the space: peers, their capacity and what they run.
    Space,
    /// A stream of status objects, one per `interval_ms` (at least 100).
    Watch {
        #[serde(default)]
        interval_ms: Option<u64>,
    },
    /// The site's batch system takes resources (prolog) or gives them back (epilog).
    BatchYield {
        job: String,
        cpus: u32,
        #[serde(default)]
        memory_bytes: Option<u64>,
    },
    BatchRelease {
        job: String,
    },
}

/// The daemon's answer: `{"ok": true, "data": …}` or `{"ok": false, "error": "…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        match serde_json::to_value(data) {
            Ok(v) => Response {
                ok: true,
                data: Some(v),
                error: None,
            },
            Err(e) => Response::error(format!("cannot encode the answer: {e}")),
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }
}

/// What serves requests (the daemon).
pub trait Controller: Send + Sync + 'static {
    fn handle(&self, req: Request) -> impl Future<Output = Response> + Send;
}

/// Who may call: root, the daemon's own user, and members of `group` (gid).
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub daemon_uid: u32,
    pub group: Option<u32>,
}

impl Access {
    /// Whether a caller with these credentials may use the API.
    pub fn allows(&self, uid: u32, gid: u32, supplementary: &[u32]) -> bool {
        uid == 0
            || uid == self.daemon_uid
            || self
                .group
                .is_some_and(|g| gid == g || supplementary.contains(&g))
    }
}

/// Why the control API failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {path}: {cause}")]
    Listen {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "cannot reach the gleaner daemon at {path}: {cause} (is it running? `gleaner daemon`, or `systemctl status gleaner`)"
    )]
    Connect {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "permission denied on {path}: add yourself to the gleaner group (`sudo usermod -aG gleaner $USER`, then log in again)"
    )]
    Permission { path: PathBuf },
    #[error("control connection: {0}")]
    Io(std::io::Error),
    #[error("the daemon sent something that is not a response: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
    #[error("control token {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
}

impl From<std::io::Error> for ControlError {
    fn from(e: std::io::Error) -> Self {
        ControlError::Io(e)
    }
}

/// The group id of `name` from /etc/group, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

fn supplementary_groups(pid: Option<i32>) -> Vec<u32> {
    let Some(pid) = pid else { return Vec::new() };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                l[7..]
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Binds the control socket at `path` (replacing a stale one), mode 0660 and owned by `group`.
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, ControlError> {
    let err = |cause| ControlError::Listen {
        path: path.to_owned(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(err)?;
    }
    Ok(listener)
}

/// Serves the control API until `cancel` fires.
pub async fn serve<C: Controller>(
    listener: UnixListener,
    access: Access,
    controller: Arc<C>,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("control accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("control: too many connections, refusing one");
            continue;
        };
        let controller = controller.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, access, controller, cancel).await {
                tracing::debug!("control connection ended: {e}");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn write_line(w: &mut (impl AsyncWriteExt + Unpin), r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    w.write_all(&line).await
}

async fn connection<C: Controller>(
    stream: UnixStream,
    access: Access,
    controller: Arc<C>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    if !access.allows(cred.uid(), cred.gid(), &supplementary_groups(cred.pid())) {
        write_line(
            &mut write,
            &Response::error(
                "permission denied: only root and the gleaner group may control the daemon",
            ),
        )
        .await?;
        return Ok(());
    }
    requests(read, write, None, controller, cancel).await
}

/// A TCP caller's proof: the token from the token file, on every request.
#[derive(Clone)]
struct TokenCheck {
    token: Arc<Token>,
    peer: String,
}

impl TokenCheck {
    /// The request inside `{"token": …, "request": {…}}`, or why it is refused.
    fn open(&self, line: &str) -> Result<Result<Request, String>, String> {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
        let Some(obj) = v.as_object() else {
            return Err("bad request: not an object".into());
        };
        match obj.get("token").and_then(|t| t.as_str()) {
            None => return Err("token refused: the request carries no token".into()),
            Some(t) if !self.token.matches(t) => {
                return Err("token refused: wrong token".into());
            }
            Some(_) => {}
        }
        if let Some(k) = obj.keys().find(|k| *k != "token" && *k != "request") {
            return Ok(Err(format!("bad request: unknown field {k:?}")));
        }
        let Some(req) = obj.get("request") else {
            return Ok(Err("bad request: no \"request\"".into()));
        };
        Ok(Request::deserialize(req).map_err(|e| format!("bad request: {e}")))
    }
}

/// Serves requests on one connection until it closes or `cancel` fires. With `check`, every
/// request must carry the token; the first that does not ends the connection.
async fn requests<C: Controller>(
    read: impl AsyncRead + Unpin,
    mut write: impl AsyncWrite + Unpin,
    check: Option<TokenCheck>,
    controller: Arc<C>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    // A line longer than MAX_REQUEST ends the connection instead of growing a buffer.
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST));
    loop {
        let line = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            l = lines.next() => l,
        };
        let line = match line {
            None => return Ok(()),
            Some(Ok(l)) => l,
            Some(Err(e)) => {
                write_line(&mut write, &Response::error(format!("bad request: {e}"))).await?;
                return Ok(());
            }
        };
        let parsed = match &check {
            None => serde_json::from_str(&line).map_err(|e| format!("bad request: {e}")),
            Some(c) => match c.open(&line) {
                Ok(r) => r,
                Err(why) => {
                    tracing::warn!("control over tcp: refused {}: {why}", c.peer);
                    write_line(&mut write, &Response::error(why)).await?;
                    return Ok(());
                }
            },
        };
        let req: Request = match parsed {
            Ok(r) => r,
            Err(e) => {
                write_line(&mut write, &Response::error(e)).await?;
                continue;
            }
        };
        if let Request::Watch { interval_ms } = req {
            let every = Duration::from_millis(interval_ms.unwrap_or(1000).max(100));
            loop {
                let r = controller.handle(Request::Status).await;
                write_line(&mut write, &r).await?;
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
        let r = controller.handle(req).await;
        write_line(&mut write, &r).await?;
    }
}

/// Serves the control API on a loopback TCP listener until `cancel` fires; every request must
/// carry `token`.
pub async fn serve_tcp<C: Controller>(
    listener: TcpListener,
    token: Token,
    controller: Arc<C>,
    cancel: CancellationToken,
) {
    let token = Arc::new(token);
    let tracker = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("control accept (tcp): {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("control: too many connections, refusing {peer}");
            continue;
        };
        let check = TokenCheck {
            token: token.clone(),
            peer: peer.to_string(),
        };
        let controller = controller.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let (read, write) = stream.into_split();
            if let Err(e) = requests(read, write, Some(check), controller, cancel).await {
                tracing::debug!("control connection (tcp) ended: {e}");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Binds the loopback TCP listener; anything but a loopback address is refused.
pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, ControlError> {
    let err = |cause| ControlError::Listen {
        path: PathBuf::from(format!("tcp {addr}")),
        cause,
    };
    if !addr.ip().is_loopback() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a loopback address",
        )));
    }
    TcpListener::bind(addr).await.map_err(err)
}

/// The token TCP callers must show: 32 random bytes in hex.
pub struct Token(String);

impl Token {
    /// Whether `given` is the token, in time independent of where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        // The length is not secret (always 64); the contents are compared without early exit.
        let mut diff = u8::from(a.len() != b.len());
        for (x, y) in a.iter().zip(b.iter().chain(std::iter::repeat(&0u8))) {
            diff |= x ^ y;
        }
        std::hint::black_box(diff) == 0
    }
}

/// The token file in the state dir.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.token")
}

/// Reads the token file, or makes one: owner read/write, and group-readable (0640) when the
/// `group` exists, as the socket is; a file others may read is replaced (its token may be known).
pub fn read_or_create_token(path: &Path, group: Option<u32>) -> Result<Token, ControlError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |reason: String| ControlError::Token {
        path: path.to_owned(),
        reason,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let t = text.trim();
        if meta.permissions().mode() & 0o007 != 0 {
            tracing::warn!(
                "{} was readable by others: making a new control token",
                path.display()
            );
        } else if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Token(t.to_owned()));
        } else {
            tracing::warn!("{} holds no token: making a new one", path.display());
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| err(format!("no randomness: {e}")))?;
    let token = hex::encode(bytes);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(e.to_string()))?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(&tmp, None, Some(g)).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640))
            .map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
    Ok(Token(token))
}

/// Reads a token file for a client.
pub fn read_token(path: &Path) -> Result<String, ControlError> {
    let text = std::fs::read_to_string(path).map_err(|e| ControlError::Token {
        path: path.to_owned(),
        reason: if e.kind() == std::io::ErrorKind::PermissionDenied {
            "permission denied: add yourself to the gleaner group (`sudo usermod -aG gleaner $USER`, then log in again)".into()
        } else {
            e.to_string()
        },
    })?;
    Ok(text.trim().to_owned())
}

/// A connection to the daemon's control API (its Unix socket, or loopback TCP with a token).
pub struct ControlClient {
    path: PathBuf,
    lines: tokio::io::Split<BufReader<Box<dyn AsyncRead + Send + Unpin>>>,
    write: Box<dyn AsyncWrite + Send + Unpin>,
    token: Option<String>,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let stream = UnixStream::connect(path).await.map_err(|cause| {
            if cause.kind() == std::io::ErrorKind::PermissionDenied {
                ControlError::Permission {
                    path: path.to_owned(),
                }
            } else {
                ControlError::Connect {
                    path: path.to_owned(),
                    cause,
                }
            }
        })?;
        let (read, write) = stream.into_split();
        Ok(ControlClient {
            path: path.to_owned(),
            lines: BufReader::new(Box::new(read) as Box<dyn AsyncRead + Send + Unpin>).split(b'\n'),
            write: Box::new(write),
            token: None,
        })
    }

    /// Connects over loopback TCP; every request will carry `token`.
    pub async fn connect_tcp(
        addr: std::net::SocketAddr,
        token: String,
    ) -> Result<ControlClient, ControlError> {
        let path = PathBuf::from(format!("tcp {addr}"));
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|cause| ControlError::Connect {
                path: path.clone(),
                cause,
            })?;
        let (read, write) = stream.into_split();
        Ok(ControlClient {
            path,
            lines: BufReader::new(Box::new(read) as Box<dyn AsyncRead + Send + Unpin>).split(b'\n'),
            write: Box::new(write),
            token: Some(token),
        })
    }

    /// Sends a request and reads one response; an error response becomes `ControlError::Refused`.
    pub async fn call(&mut self, req: &Request) -> Result<serde_json::Value, ControlError> {
        let mut line = match &self.token {
            None => serde_json::to_vec(req),
            Some(t) => serde_json::to_vec(&serde_json::json!({"token": t, "request": req})),
        }
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
        line.push(b'\n');
        if let Err(e) = self.write.write_all(&line).await {
            // The daemon may have refused us and closed first: its reason is waiting to be read.
            return match self.next().await {
                Err(ControlError::Protocol(_)) | Ok(_) => Err(ControlError::Io(e)),
                Err(refusal) => Err(refusal),
            };
        }
        self.next().await
    }

    /// Reads the next response (for `Watch` streams).
    pub async fn next(&mut self) -> Result<serde_json::Value, ControlError> {
        let line = self.lines.next_segment().await?.ok_or_else(|| {
            ControlError::Protocol(format!("{} closed the connection", self.path.display()))
        })?;
        let r: Response =
            serde_json::from_slice(&line).map_err(|e| ControlError::Protocol(e.to_string()))?;
        if r.ok {
            Ok(r.data.unwrap_or(serde_json::Value::Null))
        } else {
            let msg = r.error.unwrap_or_else(|| "refused".into());
            if msg.starts_with("permission denied") {
                return Err(ControlError::Permission {
                    path: self.path.clone(),
                });
            }
            Err(ControlError::Refused(msg))
        }
    }
}

/// The default socket: `/run/gleaner/control.sock` for root, else under `$XDG_RUNTIME_DIR`.
pub fn default_socket() -> PathBuf {
    if let Ok(p) = std::env::var("GLEANER_SOCKET") {
        return PathBuf::from(p);
    }
    // SAFETY-free check of the effective user: root's runtime dir is /run.
    let root = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    match (root, std::env::var("XDG_RUNTIME_DIR")) {
        (Ok(false), Ok(dir)) => PathBuf::from(dir).join("gleaner/control.sock"),
        _ => PathBuf::from("/run/gleaner/control.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Controller for Echo {
        async fn handle(&self, req: Request) -> Response {
            match req {
                Request::Status => Response::ok(serde_json::json!({"machines": []})),
                Request::Drain { now } => Response::ok(serde_json::json!({"now": now})),
                _ => Response::error("not here"),
            }
        }
    }

    #[test]
    fn access_rules() {
        let a = Access {
            daemon_uid: 1000,
            group: Some(500),
        };
        assert!(a.allows(0, 0, &[]));
        assert!(a.allows(1000, 1000, &[]));
        assert!(a.allows(1001, 500, &[]));
        assert!(a.allows(1001, 1001, &[7, 500]));
        assert!(!a.allows(1001, 1001, &[7]));
    }

    #[test]
    fn requests_are_typed_and_strict() {
        let r: Request = serde_json::from_str(r#"{"op":"drain","now":true}"#).unwrap();
        assert_eq!(r, Request::Drain { now: true });
        assert!(serde_json::from_str::<Request>(r#"{"op":"drain","bogus":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[tokio::test]
    async fn round_trip_over_a_socket_and_watch_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let cancel = CancellationToken::new();
        let uid = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        let server = tokio::spawn(serve(
            listener,
            Access {
                daemon_uid: uid,
                group: None,
            },
            Arc::new(Echo),
            cancel.clone(),
        ));
        let mut c = ControlClient::connect(&path).await.unwrap();
        let v = c.call(&Request::Drain { now: true }).await.unwrap();
        assert_eq!(v["now"], true);
        assert!(
            matches!(c.call(&Request::Undrain).await, Err(ControlError::Refused(m)) if m == "not here")
        );
        let mut w = ControlClient::connect(&path).await.unwrap();
        w.call(&Request::Watch {
            interval_ms: Some(100),
        })
        .await
        .unwrap();
        let second = w.next().await.unwrap();
        assert!(second["machines"].is_array());
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn tcp_needs_the_token_on_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_path(dir.path());
        let token = read_or_create_token(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let secret = read_token(&path).unwrap();
        assert_eq!(secret.len(), 64);
        // The same token after a restart; a new one if others could read it.
        assert!(read_or_create_token(&path, None).unwrap().matches(&secret));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let token2 = read_or_create_token(&path, None).unwrap();
        assert!(!token2.matches(&secret));
        assert!(!token.matches(&secret[..63]) && !token.matches(""));

        assert!(bind_tcp("10.0.0.1:0".parse().unwrap()).await.is_err());
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_tcp(listener, token2, Arc::new(Echo), cancel.clone()));
        let secret = read_token(&path).unwrap();
        let mut c = ControlClient::connect_tcp(addr, secret.clone())
            .await
            .unwrap();
        assert!(c.call(&Request::Status).await.unwrap()["machines"].is_array());
        assert_eq!(
            c.call(&Request::Drain { now: true }).await.unwrap()["now"],
            true
        );

        let mut wrong = ControlClient::connect_tcp(addr, "0".repeat(64))
            .await
            .unwrap();
        let e = wrong.call(&Request::Status).await.unwrap_err().to_string();
        assert!(e.contains("token refused: wrong token"), "{e}");
        // A plain request (as on the socket) carries no token.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"{\"op\":\"status\"}\n").await.unwrap();
        let mut answer = String::new();
        BufReader::new(raw).read_line(&mut answer).await.unwrap();
        assert!(answer.contains("carries no token"), "{answer}");
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_daemon_says_how_to_fix_it() {
        let err = ControlClient::connect(Path::new("/nonexistent/gleaner.sock"))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("is it running"), "{err}");
    }
}
