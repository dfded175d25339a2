//! The `tandem` binary: one CLI dispatching to every role (DESIGN.md §7).

mod api_access;
mod bench_kv_cuda;
mod bench_log;
mod bench_pd;
mod bench_routing;
mod bench_serve;
mod generate;
mod nats_args;
mod replay_cli;
mod role_http;
mod roles;
mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "LLM serving with prefill/decode disaggregation on a replayable event log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as readable `text`, or `json` (one object per line); the request id is on every line of a
    /// request. Traces: the `OTEL_EXPORTER_OTLP_*` variables; levels: `RUST_LOG`.
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = telemetry::LogFormat::Text)]
    log_format: telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// All roles in one process: gateway, scheduler, decode workers (embedded log unless --nats).
    Serve(roles::ServeArgs),
    /// The OpenAI-compatible HTTP gateway (needs --nats).
    Gateway(roles::GatewayArgs),
    /// The scheduler: consumes the log and routes requests (needs --nats).
    Scheduler(roles::SchedulerArgs),
    /// A prefill worker: pulls prefill jobs and pushes KV into decode workers over TCP (needs --nats).
    Prefill(roles::PrefillArgs),
    /// A decode worker: continuous batching, local prefill, token streaming (needs --nats).
    Decode(roles::DecodeArgs),
    /// Read a log: timelines, audit, stats, export, re-execution.
    Replay(replay_cli::ReplayArgs),
    /// Run the engine on token ids and print JSON (debugging without the server).
    Generate(generate::GenerateArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Appends/s and reads/s of both event-log backends.
    Log(bench_log::BenchLogArgs),
    /// Engine prefill and decode throughput.
    Engine(generate::BenchEngineArgs),
    /// KV transfer throughput (TCP loopback and in-process) against memcpy and raw-socket ceilings.
    KvTransfer(bench_pd::KvTransferArgs),
    /// Time to first token, aggregated vs disaggregated prefill, at a few prompt lengths.
    Ttft(bench_pd::TtftArgs),
    /// KV-aware routing against round-robin on a shared-prefix workload: prefix-cache hit rate and TTFT.
    Routing(bench_routing::RoutingArgs),
    /// Rebuilding a projection from a synthetic log of --events events (goal: 1M in ≤ 10 s).
    Replay(replay_cli::BenchReplayArgs),
    /// Open-loop load against an OpenAI-compatible server (or the engine in-process): TTFT/TPOT/ITL, goodput.
    Serve(bench_serve::ServeBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let signals = match &cli.command {
        Command::Serve(_) => telemetry::Signals::role("tandem"),
        Command::Gateway(_) => telemetry::Signals::role("tandem-gateway"),
        Command::Scheduler(_) => telemetry::Signals::role("tandem-scheduler"),
        Command::Prefill(_) => telemetry::Signals::role("tandem-prefill"),
        Command::Decode(_) => telemetry::Signals::role("tandem-decode"),
        _ => telemetry::Signals::LOGS_ONLY,
    };
    // Held to the end of main: dropping it exports the spans still queued.
    let _telemetry = match telemetry::init(cli.log_format, signals) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => roles::serve(args),
        Command::Gateway(args) => roles::gateway(args),
        Command::Scheduler(args) => roles::scheduler(args),
        Command::Prefill(args) => roles::prefill(args),
        Command::Decode(args) => roles::decode(args),
        Command::Replay(args) => match replay_cli::run(args) {
            Ok(code) => return code,
            Err(error) => Err(error),
        },
        Command::Generate(args) => generate::run(args),
        Command::Bench(BenchCommand::Log(args)) => bench_log::run(args),
        Command::Bench(BenchCommand::Engine(args)) => generate::bench_engine(args),
        Command::Bench(BenchCommand::KvTransfer(args)) => bench_pd::kv_transfer(args),
        Command::Bench(BenchCommand::Ttft(args)) => bench_pd::ttft_bench(args),
        Command::Bench(BenchCommand::Routing(args)) => bench_routing::run(args),
        Command::Bench(BenchCommand::Replay(args)) => replay_cli::bench(args),
        Command::Bench(BenchCommand::Serve(args)) => bench_serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
