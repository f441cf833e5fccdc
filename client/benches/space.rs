//! The space at scale: N in-process nodes on loopback (default 100, `GLEANER_BENCH_NODES`), each
//! advertising once a second, against a 10-node space measured in the same run as the baseline.
//! Prints time to a converged view, delivery ratio and p50/p99 propagation of probe adverts, bytes
//! received per node per second and per useful byte, CPU per advert per node and per node per
//! second, and the graph: connections per node (mean, min, max) and advert relay links per node.
//! The steady window opens `GLEANER_BENCH_SETTLE_S` (150) after convergence and lasts
//! `GLEANER_BENCH_WINDOW_S` (120: one ping interval, one anchor period) seconds, as does the
//! idle window. The nodes share one current-thread runtime, as the daemon runs its node on a
//! current-thread runtime of its own; `GLEANER_BENCH_RUNTIME=multi` shares a two-worker runtime
//! instead. The nodes speak TCP (noise, yamux); `GLEANER_BENCH_TRANSPORT=quic` makes them speak
//! QUIC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gleaner::advert::CapacityAdvert;
use gleaner::relay::RelayStats;
use gleaner::{Envelope, PublicKey, SecretKey};
use gleaner_client::p2p::{self, SpaceConfig, SpaceHandle};
use tokio_util::sync::CancellationToken;

/// The default window, in seconds: a whole number of ping intervals and of anchor periods.
const CYCLE_S: u64 = gleaner::chain::CHAIN_LEN as u64;
const _: () = assert!(CYCLE_S % gleaner_space::tuning::PING_INTERVAL.as_secs() == 0);

/// The daemon's allocator (client/src/main.rs), so that the nodes here cost what the daemon's do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The machine type every node runs, signed by the publisher every node trusts, and its digest:
/// what a daemon's space holds, so that a node spends on each advert what a daemon's does.
static TYPE: std::sync::LazyLock<(PublicKey, Vec<u8>, gleaner::Digest)> =
    std::sync::LazyLock::new(|| {
        let publisher = SecretKey::from_seed([0x50; 32]);
        let mut mt = gleaner::MachineType::example(publisher.public());
        mt.name = "bench".into();
        mt.not_after = 4_000_000_000;
        let bytes = Envelope::seal(&mt, &publisher).to_bytes();
        let digest = Envelope::open_bytes::<gleaner::MachineType>(&bytes)
            .expect("the bench's machine type opens")
            .digest;
        (publisher.public(), bytes, digest)
    });

/// A factory's advert as the bench's nodes make it (the same capacity every time).
fn content(key: &SecretKey, seq: u64) -> CapacityAdvert {
    CapacityAdvert {
        v: 1,
        host: key.public(),
        seq,
        at: now(),
        free_cores: 2,
        free_memory_mib: 4096,
        free_disk_mib: 10240,
        backends: 1,
        running: vec![gleaner::advert::Running {
            machine_type: TYPE.2,
            count: 1,
        }],
        owner_present: false,
        draining: false,
        benchmark: 1000,
        chain: gleaner::Digest::default(),
    }
}

/// A signed advert (what every advert was before refreshes): the useful bytes an advert brings.
fn advert(key: &SecretKey, seq: u64) -> Envelope {
    Envelope::seal(&content(key, seq), key)
}

/// CPU seconds this process has used (user + system).
fn cpu_s() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Node {
    key: SecretKey,
    handle: SpaceHandle,
    seq: Arc<AtomicU64>,
}

struct Results {
    n: usize,
    converge_s: f64,
    delivery: f64,
    p50_ms: f64,
    p99_ms: f64,
    bytes_per_node_s: f64,
    per_useful_byte: f64,
    cpu_us_per_advert_node: f64,
    cpu_ms_per_node_s: f64,
    idle_ms_per_node_s: f64,
    conns_mean: f64,
    conns_min: f64,
    conns_max: f64,
    links_mean: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(n: usize) -> Results {
    let cancel = CancellationToken::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut addrs: Vec<libp2p::Multiaddr> = Vec::new();
    for i in 0..n {
        let mut seed = [0x5b; 32];
        seed[0] = i as u8;
        seed[1] = (i >> 8) as u8;
        seed[2] = n as u8;
        let key = SecretKey::from_seed(seed);
        let mut cfg = SpaceConfig::new(format!("bench{n}"));
        cfg.listen = vec![listen_on().parse().unwrap()];
        // A tree of first contacts: the previous node and its "parent"; Kademlia does the rest.
        if i > 0 {
            cfg.bootstrap.push(addrs[i - 1].clone());
            if (i - 1) / 2 != i - 1 {
                cfg.bootstrap.push(addrs[(i - 1) / 2].clone());
            }
        }
        cfg.kad_server = Some(true);
        cfg.trusted = vec![TYPE.0];
        let (handle, a, _) = p2p::start(&key, cfg, cancel.clone()).await.unwrap();
        handle.provide(TYPE.1.clone()).await.unwrap();
        addrs.push(a[0].clone().with(libp2p::multiaddr::Protocol::P2p(
            key.public().to_string().parse().unwrap(),
        )));
        nodes.push(Node {
            key,
            handle,
            seq: Arc::new(AtomicU64::new(0)),
        });
    }
    let published = Arc::new(AtomicU64::new(0));
    let quiet = Arc::new(AtomicBool::new(false));
    // Every node advertises once a second, spread over the second.
    for (i, node) in nodes.iter().enumerate() {
        let (key, h, seq, published, cancel, quiet) = (
            node.key.clone(),
            node.handle.clone(),
            node.seq.clone(),
            published.clone(),
            cancel.clone(),
            quiet.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis((i * 1000 / n) as u64)).await;
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = every.tick() => {
                        if quiet.load(Ordering::Relaxed) {
                            continue;
                        }
                        let s = seq.fetch_add(1, Ordering::SeqCst) + 1;
                        // Signed when due, else a refresh of the last signed one (what a
                        // factory whose capacity did not change sends).
                        if h.advertise(content(&key, s)).is_ok() {
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    eprintln!("{n} nodes: started");
    let start = Instant::now();
    loop {
        let mut all = true;
        let mut low = n;
        for node in &nodes {
            let seen = node.handle.summary().await.unwrap().peers.len();
            low = low.min(seen);
            all &= seen == n;
        }
        if start.elapsed().as_secs() % 10 == 0 {
            eprintln!("{n} nodes: the emptiest view holds {low}");
        }
        if all || start.elapsed() > Duration::from_secs(300) {
            break;
        }
        // A summary is not cheap for a node (it lists its whole view): poll gently.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let converge_s = start.elapsed().as_secs_f64();
    eprintln!("{n} nodes: converged in {converge_s:.1} s");
    // Let the space settle, then measure a steady window of background adverts. Right after
    // convergence the nodes are still walking the DHT for the peers they just met (Kademlia
    // bootstraps on new routing-table entries) and exchanging identify: a window opened 3 s
    // after convergence measured that start-up, not the steady state, and swung ±50 % between
    // runs. At 100 nodes those walks dial nearly every peer, and each node then closes what it
    // dialled and does not need (`gleaner_space::trim`): 20 s after convergence that was still
    // under way (93 connections per node, ~800 dials in the window), 150 s after it was done (26
    // per node, no dial in the window), and the two windows differ twofold in CPU.
    settle(
        &nodes,
        Duration::from_secs(env_u64("GLEANER_BENCH_SETTLE_S", 150)),
    )
    .await;
    let counted = Instant::now();
    let relay0 = relay_totals(&nodes).await;
    let (in0, _) = p2p::transport_bytes();
    let (cpu0, pub0) = (cpu_s(), published.load(Ordering::Relaxed));
    // The window lasts one cycle of what every node does on a period by default, so that it
    // holds its average: each connection's ping (`tuning::PING_INTERVAL`, 120 s) and each node's
    // signed anchor (`gleaner::chain::CHAIN_LEN`, one per 120 s of refreshes). The bench starts
    // every node within a second, so both come in bursts, and a 10 s window met a burst or a lull
    // by chance: the idle windows of two runs counted 824 and 1 642 pings, their steady windows
    // 12 and 26; and steady windows took 0–0.7 signed adverts per node·s, where 0.83 is the
    // average.
    let window = Duration::from_secs(env_u64("GLEANER_BENCH_WINDOW_S", CYCLE_S).max(1));
    tokio::time::sleep(window).await;
    let (in1, _) = p2p::transport_bytes();
    let (cpu1, pub1) = (cpu_s(), published.load(Ordering::Relaxed));
    let adverts = (pub1 - pub0) as f64;
    let advert_bytes = advert(&nodes[0].key, 1).to_bytes().len() as f64;
    let useful = adverts * advert_bytes * (n - 1) as f64;
    let bytes = (in1 - in0) as f64;
    let relay1 = relay_totals(&nodes).await;
    let counted = counted.elapsed().as_secs_f64();
    eprintln!("{n} nodes: steady window measured");
    // What the relay did in the window, per node per second: what the CPU above was spent on
    // (counted from before the first node's counters were read to after the last's: summaries
    // take a while when the machine is busy).
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / (n as f64 * counted);
    let rate = |f: fn(&RelayStats) -> u64| per(f(&relay0.0), f(&relay1.0));
    eprintln!(
        "{n} nodes: in the window, per node per second: {:.1} frames sent ({:.1} with only \
         prunes and grafts), {:.1} refreshes and {:.1} signed adverts taken, {:.1} duplicates, \
         {:.1} prunes, {:.1} grafts ({:.1} answered), {:.0} frame bytes read; hosts grafted \
         back {:.2} silent, {:.2} lost, {:.2} refused; {:.2} adverts dropped; {:.3} connections \
         opened and {:.3} closed as surplus",
        rate(|s| s.frames_sent),
        rate(|s| s.frames_control),
        rate(|s| s.refreshes),
        rate(|s| s.signed),
        rate(|s| s.duplicates),
        rate(|s| s.prunes_sent),
        rate(|s| s.grafts_sent),
        rate(|s| s.grafts_answered),
        rate(|s| s.bytes_in),
        rate(|s| s.silent),
        rate(|s| s.orphaned),
        rate(|s| s.refusals),
        rate(|s| s.dropped),
        per(relay0.1, relay1.1),
        per(relay0.2, relay1.2),
    );
    // The graph after the window: connections and advert relay links per node.
    let (mut conns, mut links) = (Vec::new(), Vec::new());
    let mut relay = RelayStats::default();
    let (mut trimmed, mut banned, mut replayed, mut rejected, mut limited) = (0, 0, 0, 0, 0);
    for node in &nodes {
        if let Ok(s) = node.handle.summary().await {
            conns.push(s.connected as f64);
            links.push((s.relay.outbound + s.relay.inbound) as f64);
            add_to(&mut relay, &s.relay.stats);
            trimmed += s.trimmed;
            banned += s.banned.len();
            replayed += s.replayed;
            rejected += s.rejected_messages;
            limited += s.rate_limited;
        }
    }
    let RelayStats {
        duplicates,
        refreshes,
        signed,
        checked,
        dropped,
        prunes_sent: prunes,
        grafts_sent: grafts,
        grafts_answered: answered,
        silent,
        orphaned,
        refusals,
        bytes_in: frame_bytes,
        strangers,
        ..
    } = relay;
    // An honest space bans nobody and refuses nothing; a node that does is overloaded or wrong.
    eprintln!(
        "{n} nodes: {banned} bans in force, {replayed} replays, {rejected} rejected and \
         {limited} rate-limited messages in all"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    eprintln!(
        "{n} nodes: {:.1} connections per node (min {}, max {}; {trimmed} closed as surplus in \
         all), relay links {:.1}; \
         {signed} signed adverts ({checked} signatures checked) and {refreshes} refreshes taken, {duplicates} duplicate and {dropped} dropped adverts, {prunes} prunes and {grafts} grafts \
         ({answered} answered) in all (hosts grafted back: {silent} silent, {orphaned} after a lost link, {refusals} \
         after a refusal); {frame_bytes} bytes in relay frames, {strangers} frames from unknown \
         links",
        mean(&conns),
        conns.iter().copied().fold(f64::INFINITY, f64::min),
        conns.iter().copied().fold(0.0, f64::max),
        mean(&links)
    );

    // Probes: one node's next advert, timed until every other node holds it.
    let mut lat = Vec::new();
    let mut missed = 0usize;
    let probes = 10;
    for p in 0..probes {
        let src = &nodes[(p * 7919) % n];
        let t0 = Instant::now();
        src.handle
            .advertise(content(
                &src.key,
                src.seq.fetch_add(1, Ordering::SeqCst) + 1,
            ))
            .unwrap();
        // The seq the node gave it (a refresh's follows from its anchor), from its own view.
        let s = src
            .handle
            .seq_of(src.key.public())
            .await
            .unwrap()
            .unwrap_or(u64::MAX);
        let mut waiting: Vec<usize> = (0..n).filter(|&j| j != (p * 7919) % n).collect();
        // The nodes it reached after more than a second, and when (ms).
        let mut late: Vec<(usize, u64)> = Vec::new();
        while !waiting.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            // Ask every waiting node at once: asked one after another, a sweep took as long as
            // all the busy nodes' answers together, and that time was counted as propagation.
            let answers = futures_util::future::join_all(
                waiting
                    .iter()
                    .map(|&j| nodes[j].handle.seq_of(src.key.public())),
            )
            .await;
            let at = t0.elapsed().as_secs_f64() * 1000.0;
            let mut still = Vec::new();
            for (&j, a) in waiting.iter().zip(answers) {
                match a {
                    Ok(Some(got)) if got >= s => {
                        lat.push(at);
                        if at > 1000.0 {
                            late.push((j, at as u64));
                        }
                    }
                    _ => still.push(j),
                }
            }
            waiting = still;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        missed += waiting.len();
        if !late.is_empty() || !waiting.is_empty() {
            eprintln!(
                "{n} nodes: probe {p} from node {}: late (> 1 s) at nodes {:?}; missed by {:?}",
                (p * 7919) % n,
                late,
                waiting
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lat.sort_by(f64::total_cmp);
    // The same space with nobody advertising: what a node costs with no adverts to carry. Until
    // the adverts expire, every node grafts every host back every few seconds, looking for the
    // adverts that stopped (the relay's repair); measured 3 s after the adverts stopped, that
    // storm was most of the "idle" cost (1.0–1.3 ms/s per node at 100 nodes, and 3.7 kB/s). So
    // the window opens once every host is forgotten.
    quiet.store(true, Ordering::Relaxed);
    eprintln!("{n} nodes: quiet");
    tokio::time::sleep(Duration::from_secs(gleaner::space::ADVERT_TTL_S + 5)).await;
    let before = relay_totals(&nodes).await;
    let (c0, (b0, _)) = (cpu_s(), p2p::transport_bytes());
    tokio::time::sleep(window).await;
    let per_node_s = n as f64 * window.as_secs_f64();
    let idle_ms_per_node_s = (cpu_s() - c0) * 1e3 / per_node_s;
    let idle_bytes = (p2p::transport_bytes().0 - b0) as f64 / per_node_s;
    let after = relay_totals(&nodes).await;
    // Relay frames, connections opened or trimmed here are work an idle space should not have
    // (grafts for hosts not yet forgotten, a node below its target walking the DHT): shown so
    // that an idle figure can be read.
    let idle =
        |f: fn(&RelayStats) -> u64| f(&after.0).saturating_sub(f(&before.0)) as f64 / per_node_s;
    eprintln!(
        "{n} nodes: idle {idle_ms_per_node_s:.2} ms/s and {idle_bytes:.0} B/s received per node; \
         per node per second {:.2} relay frames sent ({:.0} bytes read), {:.2} grafts, {:.3} \
         connections opened and {:.3} closed as surplus",
        idle(|s| s.frames_sent),
        idle(|s| s.bytes_in),
        idle(|s| s.grafts_sent),
        after.1.saturating_sub(before.1) as f64 / per_node_s,
        after.2.saturating_sub(before.2) as f64 / per_node_s,
    );
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    Results {
        n,
        converge_s,
        delivery: lat.len() as f64 / (lat.len() + missed) as f64,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        bytes_per_node_s: bytes / n as f64 / window.as_secs_f64(),
        per_useful_byte: bytes / useful,
        cpu_us_per_advert_node: (cpu1 - cpu0) * 1e6 / (adverts * n as f64),
        cpu_ms_per_node_s: (cpu1 - cpu0) * 1e3 / (n as f64 * window.as_secs_f64()),
        idle_ms_per_node_s,
        conns_mean: mean(&conns),
        conns_min: conns.iter().copied().fold(f64::INFINITY, f64::min),
        conns_max: conns.iter().copied().fold(0.0, f64::max),
        links_mean: mean(&links),
    }
}

/// Waits `span` for the space to settle, saying every 30 s how it goes: connections per node,
/// those opened and closed as surplus, and the CPU per node, since the last look. A space still
/// dialling and trimming when the window opens is measured in its start-up, not its steady state.
async fn settle(nodes: &[Node], span: Duration) {
    let n = nodes.len() as f64;
    let end = Instant::now() + span;
    let mut last = (Instant::now(), cpu_s(), relay_totals(nodes).await);
    while Instant::now() + Duration::from_secs(30) < end {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (at, cpu) = (Instant::now(), cpu_s());
        let totals = relay_totals(nodes).await;
        let mut conns = 0;
        for node in nodes {
            if let Ok(s) = node.handle.summary().await {
                conns += s.connected;
            }
        }
        let s = at.duration_since(last.0).as_secs_f64() * n;
        eprintln!(
            "{} nodes: settling: {:.1} connections per node; per node per second {:.3} opened, \
             {:.3} closed as surplus, {:.2} ms CPU",
            nodes.len(),
            conns as f64 / n,
            totals.1.saturating_sub((last.2).1) as f64 / s,
            totals.2.saturating_sub((last.2).2) as f64 / s,
            (cpu - last.1) * 1e3 / s,
        );
        last = (Instant::now(), cpu_s(), totals);
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
}

/// The relay's counters summed over every node, with the connections opened and those closed as
/// surplus.
async fn relay_totals(nodes: &[Node]) -> (RelayStats, u64, u64) {
    let (mut t, mut opened, mut trimmed) = (RelayStats::default(), 0, 0);
    for node in nodes {
        if let Ok(s) = node.handle.summary().await {
            add_to(&mut t, &s.relay.stats);
            opened += s.opened;
            trimmed += s.trimmed;
        }
    }
    (t, opened, trimmed)
}

/// Adds one node's relay counters to a sum.
fn add_to(t: &mut RelayStats, s: &RelayStats) {
    t.duplicates += s.duplicates;
    t.signed += s.signed;
    t.refreshes += s.refreshes;
    t.checked += s.checked;
    t.anchors_asked += s.anchors_asked;
    t.prunes_sent += s.prunes_sent;
    t.grafts_sent += s.grafts_sent;
    t.grafts_answered += s.grafts_answered;
    t.bytes_in += s.bytes_in;
    t.strangers += s.strangers;
    t.silent += s.silent;
    t.orphaned += s.orphaned;
    t.refusals += s.refusals;
    t.dropped += s.dropped;
    t.frames_sent += s.frames_sent;
    t.frames_control += s.frames_control;
}

/// Whether the nodes speak QUIC (`GLEANER_BENCH_TRANSPORT=quic`) rather than TCP with noise and
/// yamux, the default.
fn quic() -> bool {
    std::env::var("GLEANER_BENCH_TRANSPORT").as_deref() == Ok("quic")
}

/// Where the bench's nodes listen: loopback, on the transport [`quic`] chose.
fn listen_on() -> &'static str {
    if quic() {
        "/ip4/127.0.0.1/udp/0/quic-v1"
    } else {
        "/ip4/127.0.0.1/tcp/0"
    }
}

/// A whole number from the environment, or `default` when unset or not a number.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env_u64("GLEANER_BENCH_NODES", 100) as usize;
    let rt = if std::env::var("GLEANER_BENCH_RUNTIME").as_deref() != Ok("multi") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let base = rt.block_on(run(10));
    let big = rt.block_on(run(n));
    let transport = if quic() { "QUIC" } else { "TCP" };
    println!("space benchmark: {n} nodes vs a 10-node baseline, same run, loopback {transport}");
    println!(
        "| metric | {} nodes | 10 nodes (baseline) | ratio | goal |",
        big.n
    );
    println!("| --- | --- | --- | --- | --- |");
    let row = |m: &str, a: f64, b: f64, unit: &str, goal: &str| {
        println!(
            "| {m} | {a:.2} {unit} | {b:.2} {unit} | {:.2}× | {goal} |",
            a / b
        )
    };
    row(
        "time to a converged view",
        big.converge_s,
        base.converge_s,
        "s",
        "",
    );
    row(
        "delivery ratio (probes)",
        big.delivery * 100.0,
        base.delivery * 100.0,
        "%",
        "100 %",
    );
    row("propagation p50", big.p50_ms, base.p50_ms, "ms", "");
    row(
        "propagation p99",
        big.p99_ms,
        base.p99_ms,
        "ms",
        "≤ 1000 ms",
    );
    // Only the TCP transport is metered (`gleaner_space::transport_bytes`): on QUIC the byte
    // rows would read 0, and "0 × per useful byte" beside its goal would pass for a result.
    if quic() {
        println!("| bytes received | not metered on QUIC | | | ≤ 2.5× per useful byte |");
    } else {
        row(
            "bytes received per node",
            big.bytes_per_node_s,
            base.bytes_per_node_s,
            "B/s",
            "",
        );
        row(
            "bytes received per useful byte",
            big.per_useful_byte,
            base.per_useful_byte,
            "×",
            "≤ 2.5×",
        );
    }
    row(
        "CPU per advert per node",
        big.cpu_us_per_advert_node,
        base.cpu_us_per_advert_node,
        "µs",
        "≤ 20 µs",
    );
    row(
        "CPU per node",
        big.cpu_ms_per_node_s,
        base.cpu_ms_per_node_s,
        "ms/s",
        "",
    );
    row(
        "CPU per node, nobody advertising",
        big.idle_ms_per_node_s,
        base.idle_ms_per_node_s,
        "ms/s",
        "",
    );
    // What carrying adverts adds to a node's CPU, per advert: the total above less what the
    // node costs with nobody advertising (connections, timers, DHT), which does not grow with
    // the adverts. Shown beside the goal's total, not instead of it.
    let beyond =
        |r: &Results| r.cpu_us_per_advert_node * (1.0 - r.idle_ms_per_node_s / r.cpu_ms_per_node_s);
    row(
        "CPU per advert per node beyond idle",
        beyond(&big),
        beyond(&base),
        "µs",
        "",
    );
    row(
        "connections per node (mean)",
        big.conns_mean,
        base.conns_mean,
        "",
        "",
    );
    row(
        "connections per node (min)",
        big.conns_min,
        base.conns_min,
        "",
        "",
    );
    row(
        "connections per node (max)",
        big.conns_max,
        base.conns_max,
        "",
        "",
    );
    row(
        "advert relay links per node (mean)",
        big.links_mean,
        base.links_mean,
        "",
        "",
    );
}
