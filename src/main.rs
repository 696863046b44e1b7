//! The `autofocus` command: see `autofocus --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

// The forward pass allocates and frees many large buffers; mimalloc keeps
// them mapped instead of returning pages to the OS after every op.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
