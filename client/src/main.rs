//! The `gleaner` binary: a thin shell over the client library's command line.

/// mimalloc, not glibc's malloc: see `mimalloc` in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gleaner_client::cli::main()
}
