//! The replay benchmark without the `tandem` binary (`tandem bench replay` runs the same code):
//! `cargo run --release -p tandem-replay --example bench_replay -- [EVENTS] [--redb]`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut events = 1_000_000u64;
    let mut with_redb = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--redb" => with_redb = true,
            number => match number.parse() {
                Ok(count) => events = count,
                Err(_) => {
                    eprintln!("usage: bench_replay [EVENTS] [--redb]");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("error: creating a temp dir: {error}");
            return ExitCode::FAILURE;
        }
    };
    match tandem_replay::bench::run(&dir.path().join("log"), events, 32, with_redb).await {
        Ok(figures) => {
            print!("{}", figures.render_text());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
