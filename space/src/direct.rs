//! Relay links on TCP connections of their own: noise (the node's libp2p identity, so a link's
//! peer is proven as on the swarm), no yamux, no swarm. [`crate::links::Links`] reads and writes
//! them in the node's own task.
//!
//! A relay link carried on a swarm connection crossed that connection's task twice per frame: the
//! writer's stream woke the task, which ran yamux and noise and wrote the socket; at the reader the
//! socket woke the task, which read, decrypted and demultiplexed it and woke the stream. At 100
//! nodes those tasks were half of a steady node's CPU (docs/BENCHMARKS.md). On a connection of its
//! own a frame is encrypted and written by the task that sent it, and read where it is handled
//! (the relay's flush); nothing wakes in between.
//!
//! The link is still opened on the swarm ([`crate::links::RELAY_PROTOCOL`]): the peer that accepts
//! says on the stream which TCP port its direct links listen on ([`hello`]), and the opener dials
//! that port at the address it is connected to the peer on. If it cannot (the peer has none, the
//! dial or handshake fails, the peer on the other end is not the one asked), it says so
//! ([`STAY`]) and the stream itself is the link, as before. Direct connections are counted by
//! [`crate::swarm::transport_bytes`] like the swarm's and get the same kernel keepalive.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::futures::io::{AsyncRead, AsyncWrite};
use libp2p::futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, noise, tcp};
use tokio::sync::Semaphore;

use crate::swarm::{Metered, keep_alive};

/// A link's byte stream: a swarm stream or a direct connection.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}
/// A link's byte stream, boxed.
pub type LinkStream = Box<dyn ByteStream>;

/// What the opener writes on the swarm stream when it keeps the stream as the link.
pub const STAY: u8 = b'S';
/// The noise prologue of direct links: a handshake meant for the swarm's listener, or for
/// another protocol, fails here (and the other way round).
const PROLOGUE: &[u8] = b"/gleaner/adverts-direct/1";
/// How long a direct dial and its handshake may take before the opener stays on the stream.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound handshakes under way at most; a connection beyond them is closed at once.
const HANDSHAKES: usize = 16;

/// Where a node's direct links listen, and the identity they prove.
#[derive(Clone)]
pub struct DirectConfig {
    pub keypair: Keypair,
    /// The address to listen on (port 0: any).
    pub listen: SocketAddr,
}

impl DirectConfig {
    /// Direct links for a node whose swarm listens at `listen`: on the IP of its first TCP listen
    /// address, any port. `None` without one (a QUIC-only node keeps its links on the swarm).
    pub fn for_swarm(keypair: &Keypair, listen: &[Multiaddr]) -> Option<DirectConfig> {
        let ip = listen.iter().find_map(|a| {
            let ip = ip_of(a)?;
            matches!(a.iter().nth(1)?, Protocol::Tcp(_)).then_some(ip)
        })?;
        Some(DirectConfig {
            keypair: keypair.clone(),
            listen: SocketAddr::new(ip, 0),
        })
    }
}

/// The IP address a multiaddr starts with, if it does.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

/// A direct links listener: its port, and the task accepting on it.
pub(crate) struct Listener {
    pub port: u16,
    pub keypair: Keypair,
    pub task: tokio::task::AbortHandle,
}

/// The two bytes an accepting peer writes first on the swarm stream: its direct port, big-endian
/// (0: none).
pub fn hello(port: u16) -> [u8; 2] {
    port.to_be_bytes()
}

fn noise_config(keypair: &Keypair) -> Result<noise::Config, String> {
    noise::Config::new(keypair)
        .map(|c| c.with_prologue(PROLOGUE.to_vec()))
        .map_err(|e| format!("noise: {e}"))
}

/// Binds `cfg.listen` and accepts direct links on it in a spawned task, each handed to `admit`
/// with the peer its handshake proved. Must be called inside a tokio runtime.
pub(crate) fn listen<F, Fut>(cfg: &DirectConfig, admit: F) -> Result<Listener, String>
where
    F: Fn(PeerId, LinkStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let noise = noise_config(&cfg.keypair)?;
    let std = std::net::TcpListener::bind(cfg.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("direct relay links: listening on {}: {e}", cfg.listen))?;
    let port = std
        .local_addr()
        .map_err(|e| format!("direct relay links: {e}"))?
        .port();
    let listener =
        tokio::net::TcpListener::from_std(std).map_err(|e| format!("direct relay links: {e}"))?;
    let admit = Arc::new(admit);
    let room = Arc::new(Semaphore::new(HANDSHAKES));
    let task = tokio::spawn(async move {
        loop {
            let (socket, from) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: the next accept may work.
                    tracing::debug!("direct relay links: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = room.clone().try_acquire_owned() else {
                tracing::debug!(%from, "direct relay link refused: {HANDSHAKES} handshakes under way");
                continue;
            };
            let (noise, admit) = (noise.clone(), admit.clone());
            tokio::spawn(async move {
                let shake = noise.upgrade_inbound(wrap(socket), "");
                match tokio::time::timeout(DIAL_TIMEOUT, shake).await {
                    Ok(Ok((peer, io))) => {
                        drop(permit);
                        admit(peer, Box::new(io)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%from, "direct relay link handshake: {e}"),
                    Err(_) => tracing::debug!(%from, "direct relay link handshake timed out"),
                }
            });
        }
    })
    .abort_handle();
    Ok(Listener {
        port,
        keypair: cfg.keypair.clone(),
        task,
    })
}

/// A TCP socket as a link's transport: kernel keepalive, no Nagle delay, bytes counted.
fn wrap(socket: tokio::net::TcpStream) -> Metered<tcp::tokio::TcpStream> {
    keep_alive(&socket);
    if let Err(e) = socket.set_nodelay(true) {
        tracing::debug!("direct relay link: TCP_NODELAY not set: {e}");
    }
    Metered(tcp::tokio::TcpStream(socket))
}

/// Dials `peer`'s direct links at `ip:port` and proves it is `peer` (within [`DIAL_TIMEOUT`]).
pub async fn dial(
    keypair: &Keypair,
    peer: PeerId,
    ip: IpAddr,
    port: u16,
) -> Result<LinkStream, String> {
    let noise = noise_config(keypair)?;
    let to = SocketAddr::new(ip, port);
    let attempt = async {
        let socket = tokio::net::TcpStream::connect(to)
            .await
            .map_err(|e| format!("dial {to}: {e}"))?;
        let (proved, io) = noise
            .upgrade_outbound(wrap(socket), "")
            .await
            .map_err(|e| format!("handshake with {to}: {e}"))?;
        if proved != peer {
            return Err(format!("{to} is {proved}, not {peer}"));
        }
        Ok(Box::new(io) as LinkStream)
    };
    tokio::time::timeout(DIAL_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no direct link to {to} after {DIAL_TIMEOUT:?}"))?
}

/// The accepting side of an open on the swarm: says this node's direct port (0: none), then waits
/// for the opener's choice. The stream, if the opener stays on it; `None` if it went direct (it
/// closes the stream) or gave up.
pub(crate) async fn accept_stream<S: ByteStream>(
    mut stream: S,
    port: u16,
    wait: Duration,
) -> Option<S> {
    let choice = async {
        stream.write_all(&hello(port)).await.ok()?;
        stream.flush().await.ok()?;
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.ok()?;
        (b[0] == STAY).then_some(())
    };
    match tokio::time::timeout(wait, choice).await {
        Ok(Some(())) => Some(stream),
        _ => None,
    }
}

/// The opening side: reads the peer's direct port and dials it if this node can (`direct`: its
/// identity, and `ip`: where it is connected to the peer); stays on the stream otherwise, or if the
/// dial fails. The link's stream, and whether it is direct.
pub(crate) async fn open_stream<S: ByteStream + 'static>(
    mut stream: S,
    peer: PeerId,
    direct: Option<(&Keypair, IpAddr)>,
) -> Result<(LinkStream, bool), String> {
    let mut port = [0u8; 2];
    stream
        .read_exact(&mut port)
        .await
        .map_err(|e| format!("reading the peer's hello: {e}"))?;
    let port = u16::from_be_bytes(port);
    if let (Some((keypair, ip)), true) = (direct, port != 0) {
        match dial(keypair, peer, ip, port).await {
            // The stream is dropped: the peer's wait for a choice ends.
            Ok(io) => return Ok((io, true)),
            Err(e) => tracing::debug!(%peer, "relay link stays on the swarm: {e}"),
        }
    }
    stream
        .write_all(&[STAY])
        .await
        .and(stream.flush().await)
        .map_err(|e| format!("choosing the stream: {e}"))?;
    Ok((Box::new(stream), false))
}
