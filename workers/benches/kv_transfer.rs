//! `cargo bench -p tandem-workers --bench kv_transfer [-- TRANSFER_MIB [ITERATIONS]]`: KV transfer
//! throughput over TCP on loopback and in process, beside a memcpy and a raw loopback socket measured in
//! the same run (the report of `tandem_workers::transfer::bench`). Prints figures; asserts nothing.

use tandem_workers::transfer::bench::{KvTransferBenchOptions, run};

fn main() {
    // `cargo bench` passes `--bench`; numbers are the only arguments this takes.
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let defaults = KvTransferBenchOptions::default();
    let options = KvTransferBenchOptions {
        transfer_bytes: numbers
            .first()
            .map_or(defaults.transfer_bytes, |mib| mib << 20),
        iterations: numbers.get(1).copied().unwrap_or(defaults.iterations),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kv_transfer bench: cannot start a tokio runtime: {error}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(options)) {
        Ok(report) => print!("{report}"),
        Err(error) => {
            eprintln!("kv_transfer bench failed: {error}");
            std::process::exit(1);
        }
    }
}
