//! `gleaner-gui`: the desktop window on the local Gleaner daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gleaner_gui::model::View;

/// A window on the local Gleaner daemon: what runs and why, pause and resume, limits, projects
/// and credit. Users must be in the gleaner group to control the daemon.
#[derive(Parser)]
#[command(name = "gleaner-gui", version)]
struct Args {
    /// The daemon's control socket [default: $GLEANER_SOCKET, else as `gleaner status` finds it]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The view to open: status, limits, projects or credit
    #[arg(long, default_value = "status", value_parser = parse_view)]
    view: View,
    /// Save a PNG of the window once its data has arrived, then exit (for bug reports and tests)
    #[arg(long, value_name = "FILE")]
    screenshot: Option<PathBuf>,
}

fn parse_view(s: &str) -> Result<View, String> {
    View::ALL
        .into_iter()
        .find(|v| v.title().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?}: choose status, limits, projects or credit"))
}

/// Exit codes: 0 closed normally, 1 the window could not open or the screenshot failed, 2 usage.
fn main() -> ExitCode {
    let args = Args::parse();
    let socket = args
        .socket
        .unwrap_or_else(gleaner_client::control::default_socket);
    let (driver, script) = match args.screenshot {
        Some(path) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let script =
                gleaner_gui::app::screenshot_script(tx, args.view, path, Duration::from_secs(60));
            (Some(rx), Some(script))
        }
        None => (None, None),
    };
    if let Err(e) = gleaner_gui::app::run(socket, args.view, driver) {
        eprintln!("gleaner-gui: cannot open the window: {e}");
        return ExitCode::from(1);
    }
    match script.map(|s| s.join()) {
        Some(Ok(Err(e))) => {
            eprintln!("gleaner-gui: screenshot: {e}");
            ExitCode::from(1)
        }
        Some(Ok(Ok(shown))) => {
            println!("gleaner-gui: screenshot saved: {shown}");
            ExitCode::SUCCESS
        }
        Some(Err(_)) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}
