//! The `gleaner-vmhost` binary: started by `gleaner daemon` with a pipe on its stdin and stdout,
//! it serves the libvirt runtime until the daemon closes the pipe. Exit codes: 0 the pipe closed,
//! 1 the pipe or protocol broke, 2 started by hand (stdin is a terminal).

use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("gleaner-vmhost {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if std::io::stdin().is_terminal() {
        eprintln!(
            "gleaner-vmhost: the VM helper of `gleaner daemon`, which starts it with a pipe \
             when it needs libvirt; it is not run by hand"
        );
        return ExitCode::from(2);
    }
    // Logs go to stderr (the daemon's log); stdout carries only the protocol.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gleaner-vmhost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        // Ctrl-C in the daemon's terminal or SIGTERM to its process group is for the daemon,
        // which stops its VMs through this helper while it shuts down: the helper ends when the
        // daemon closes the pipe, not before.
        use tokio::signal::unix::{SignalKind, signal};
        let _int = signal(SignalKind::interrupt());
        let _term = signal(SignalKind::terminate());
        gleaner_vmhost::serve::serve(tokio::io::stdin(), tokio::io::stdout()).await
    });
    // A libvirt call still running for a request nobody waits for any more is not waited out.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gleaner-vmhost: {e}");
            ExitCode::FAILURE
        }
    }
}
