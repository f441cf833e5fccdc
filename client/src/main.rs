//! The `gleaner` binary: a thin shell over the client library's command line.

fn main() -> std::process::ExitCode {
    gleaner_client::cli::main()
}
