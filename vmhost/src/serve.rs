//! The helper's side of the pipe: requests from the daemon (length-delimited CBOR frames on
//! stdin, see `gleaner_client::runtime::vmhost`) run against the libvirt runtime, each in its own
//! task, at most `MAX_IN_FLIGHT` at a time; answers go back on stdout with the request's id.
//! The loop ends when the daemon closes the pipe.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use gleaner_client::runtime::vmhost::{
    MAX_IN_FLIGHT, PROTOCOL, Reply, ReplyFrame, Request, RequestFrame, codec, decode, encode,
};
use gleaner_client::runtime::{MachineState, Runtime, RuntimeError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::libvirt::LibvirtRuntime;

/// Serves requests from `input` with answers on `output` until `input` ends. The first request
/// must be `Open`; an `Open` that fails is answered with why, and the loop ends. An `Err` is a
/// broken pipe or protocol (said how), never a failed request (those are answered).
pub async fn serve<R, W>(input: R, output: W) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut requests = FramedRead::new(input, codec());
    let mut out = FramedWrite::new(output, codec());
    // One writer task owns the output; answers wait for it in a bounded queue.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            out.send(tokio_util::bytes::Bytes::from(bytes))
                .await
                .map_err(|e| format!("cannot answer the daemon: {e}"))?;
        }
        Ok::<(), String>(())
    });
    let Some(first) = next(&mut requests).await? else {
        return Ok(());
    };
    let opened = match first.body {
        Request::Open {
            protocol,
            config,
            domain_type,
        } if protocol == PROTOCOL => {
            let uri = config.uri.clone();
            LibvirtRuntime::connect(config).await.inspect(|rt| {
                if let Some(t) = domain_type {
                    rt.set_domain_type(t);
                }
                tracing::debug!(%uri, "connected to libvirtd");
            })
        }
        Request::Open { protocol, .. } => Err(RuntimeError::Unsupported(format!(
            "this helper speaks protocol {PROTOCOL}, the daemon {protocol}: install the \
             gleaner-vmhost of the same release as gleaner"
        ))),
        other => Err(RuntimeError::Unsupported(format!(
            "the first request must open the connection, not {other:?}"
        ))),
    };
    let rt = match opened {
        Ok(rt) => {
            answer(
                &tx,
                first.id,
                Ok(Reply::Opened {
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
            )
            .await?;
            Arc::new(rt)
        }
        Err(e) => {
            answer(&tx, first.id, Err(e)).await?;
            drop(tx);
            return writer.await.map_err(|e| e.to_string())?;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(f) = next(&mut requests).await? {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (rt, tx) = (rt.clone(), tx.clone());
        tasks.spawn(async move {
            let body = handle(&rt, f.body).await;
            let r = answer(&tx, f.id, body).await;
            drop(slot);
            r
        });
        // Reap finished tasks as we go, so the set holds only those under way.
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| e.to_string())??;
        }
    }
    // The daemon closed the pipe: it wants no more answers.
    tasks.abort_all();
    Ok(())
}

async fn next<R: AsyncRead + Unpin>(
    requests: &mut FramedRead<R, tokio_util::codec::LengthDelimitedCodec>,
) -> Result<Option<RequestFrame>, String> {
    match requests.next().await {
        None => Ok(None),
        Some(Err(e)) => Err(format!("cannot read a request: {e}")),
        Some(Ok(bytes)) => decode(&bytes).map(Some),
    }
}

async fn answer(
    tx: &mpsc::Sender<Vec<u8>>,
    id: u64,
    body: Result<Reply, RuntimeError>,
) -> Result<(), String> {
    let bytes = encode(&ReplyFrame { id, body })?;
    tx.send(bytes)
        .await
        .map_err(|_| "the answer pipe is closed".to_owned())
}

async fn handle(rt: &LibvirtRuntime, req: Request) -> Result<Reply, RuntimeError> {
    let done = |()| Reply::Done;
    let r = match req {
        Request::Open { .. } => Err(RuntimeError::Unsupported(
            "the connection is open already".into(),
        )),
        Request::Probe => rt.probe().await.map(Reply::Probe),
        Request::Create(spec) => rt.create(&spec).await.map(Reply::Handle),
        Request::Start(m) => rt.start(&m).await.map(done),
        Request::Freeze(m) => rt.freeze(&m).await.map(done),
        Request::Thaw(m) => rt.thaw(&m).await.map(done),
        Request::SetLimits(m, l) => rt.set_limits(&m, l).await.map(done),
        Request::State(m) => rt.state(&m).await.map(Reply::State),
        Request::Sample(m) => rt.sample(&m).await.map(Reply::Usage),
        Request::Stop(m, grace) => rt.stop(&m, grace).await.map(Reply::State),
        Request::Remove(m) => rt.remove(&m).await.map(done),
        Request::ListOwned => rt.list_owned().await.map(Reply::Owned),
        Request::RemoveStrays => rt.remove_strays().await.map(Reply::Removed),
        Request::Busy => rt.list_owned().await.map(|l| {
            Reply::Busy(
                l.iter()
                    .any(|m| matches!(m.state, MachineState::Running | MachineState::Frozen)),
            )
        }),
    };
    r.inspect_err(|e| tracing::debug!("request failed: {e}"))
}
