//! The GUI's connection to the daemon: a thread with its own small async runtime that keeps a
//! `Watch` stream of status open, sends the owner's requests, turns answers into [`Msg`]s, and
//! reconnects by itself when the daemon comes and goes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gleaner_client::control::{ControlClient, Request};
use tokio::sync::mpsc;

use crate::model::{Ask, Msg, Problem};

/// How the backend wakes the UI after sending it a message.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// The UI's end: requests go in, messages come out.
pub struct Backend {
    requests: mpsc::Sender<(Ask, Request)>,
    pub messages: std::sync::mpsc::Receiver<Msg>,
}

/// How often status is streamed, and credit re-read.
const WATCH_MS: u64 = 1000;
const CREDIT_EVERY: Duration = Duration::from_secs(15);
const RETRY: Duration = Duration::from_secs(2);

impl Backend {
    /// Starts the backend thread talking to `socket`.
    pub fn start(socket: PathBuf, wake: Wake) -> Backend {
        let (req_tx, req_rx) = mpsc::channel(32);
        let (msg_tx, msg_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("gleaner-gui-backend".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime builds");
                rt.block_on(run(socket, req_rx, msg_tx, wake));
            })
            .expect("spawn the backend thread");
        Backend {
            requests: req_tx,
            messages: msg_rx,
        }
    }

    /// Queues a request; when the queue is full the click is dropped (the owner may click again).
    pub fn send(&self, ask: Ask, req: Request) {
        let _ = self.requests.try_send((ask, req));
    }
}

async fn run(
    socket: PathBuf,
    mut requests: mpsc::Receiver<(Ask, Request)>,
    out: std::sync::mpsc::Sender<Msg>,
    wake: Wake,
) {
    let emit = |m: Msg| {
        let ok = out.send(m).is_ok();
        wake();
        ok
    };
    loop {
        let problem = session(&socket, &mut requests, &emit).await;
        if !emit(Msg::Disconnected(problem)) {
            return;
        }
        // Requests made while down fail at once rather than wait for a daemon that may not come.
        let until = tokio::time::sleep(RETRY);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = &mut until => break,
                r = requests.recv() => match r {
                    None => return,
                    Some((ask, _)) => {
                        emit(Msg::Reply { ask, result: Err("the daemon is not reachable".into()) });
                    }
                },
            }
        }
    }
}

/// One connected session; returns why it ended.
async fn session(
    socket: &std::path::Path,
    requests: &mut mpsc::Receiver<(Ask, Request)>,
    emit: &impl Fn(Msg) -> bool,
) -> Problem {
    let mut watch = match ControlClient::connect(socket).await {
        Ok(c) => c,
        Err(e) => return Problem::from_error(&e),
    };
    // The first status also proves we are allowed in (the daemon refuses by message, not at connect).
    let first = match watch
        .call(&Request::Watch {
            interval_ms: Some(WATCH_MS),
        })
        .await
    {
        Ok(v) => v,
        Err(e) => return Problem::from_error(&e),
    };
    let mut calls = match ControlClient::connect(socket).await {
        Ok(c) => c,
        Err(e) => return Problem::from_error(&e),
    };
    emit(Msg::Connected);
    if let Ok(s) = serde_json::from_value(first) {
        emit(Msg::Status(Box::new(s)));
    }
    let mut credit_timer = tokio::time::interval(CREDIT_EVERY);
    credit_timer.tick().await;
    loop {
        tokio::select! {
            next = watch.next() => match next {
                Ok(v) => match serde_json::from_value(v) {
                    Ok(s) => { emit(Msg::Status(Box::new(s))); }
                    Err(e) => return Problem::Other(format!("the daemon's status is not readable: {e}")),
                },
                Err(e) => return Problem::from_error(&e),
            },
            r = requests.recv() => {
                let Some((ask, req)) = r else { return Problem::Other("the window closed".into()) };
                match calls.call(&req).await {
                    Ok(v) => { emit(Msg::Reply { ask, result: Ok(v) }); }
                    Err(gleaner_client::control::ControlError::Refused(e)) => {
                        emit(Msg::Reply { ask, result: Err(e) });
                    }
                    Err(e) => {
                        emit(Msg::Reply { ask, result: Err(e.to_string()) });
                        return Problem::from_error(&e);
                    }
                }
                // A change shows in the next status; credit and policy are asked for again.
                if matches!(ask, Ask::Limits) {
                    if let Ok(v) = calls.call(&Request::Limits { set: None }).await {
                        emit(Msg::Reply { ask: Ask::Policy, result: Ok(v) });
                    }
                }
            },
            _ = credit_timer.tick() => {
                match calls.call(&Request::Credit).await {
                    Ok(v) => { emit(Msg::Reply { ask: Ask::Credit, result: Ok(v) }); }
                    Err(gleaner_client::control::ControlError::Refused(_)) => {}
                    Err(e) => return Problem::from_error(&e),
                }
            },
        }
    }
}
