//! The `tandem` binary: one CLI dispatching to every role (DESIGN.md §7).

mod bench_log;
mod generate;

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
}

#[derive(Subcommand)]
enum Command {
    /// All roles in one process: gateway, scheduler, prefill and decode workers.
    Serve(RoleArgs),
    /// The OpenAI-compatible HTTP gateway.
    Gateway(RoleArgs),
    /// The scheduler: consumes the log, keeps redb projections, routes requests.
    Scheduler(RoleArgs),
    /// A prefill worker: pulls prefill jobs and pushes KV into decode workers.
    Prefill(RoleArgs),
    /// A decode worker: continuous batching, local prefill, token streaming.
    Decode(RoleArgs),
    /// Read a log: timelines, audit, stats, export, re-execution.
    Replay {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
}

/// Flags shared by the roles; they are parsed now so the CLI contract is visible even where a role is not built.
#[derive(clap::Args)]
struct RoleArgs {
    /// Hugging Face Qwen3 folder; the built-in model when absent.
    #[arg(long, env = "TANDEM_MODEL")]
    model: Option<std::path::PathBuf>,
    /// NATS URL of the JetStream log; the embedded log when absent.
    #[arg(long, env = "TANDEM_NATS")]
    nats: Option<String>,
    /// Where the embedded log keeps its data.
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
    data_dir: std::path::PathBuf,
    #[arg(long, env = "TANDEM_HOST", default_value = "0.0.0.0")]
    host: String,
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    port: u16,
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME", default_value = "qwen3")]
    served_model_name: String,
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    device: String,
}

fn not_built(role: &str, issue: &str) -> ExitCode {
    eprintln!("tandem {role}: not built yet (filed as the issue \"{issue}\")");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(_) => return not_built("serve", "Gateway and `tandem serve`"),
        Command::Gateway(_) => return not_built("gateway", "Gateway and `tandem serve`"),
        Command::Scheduler(_) => return not_built("scheduler", "The scheduler"),
        Command::Prefill(_) => return not_built("prefill", "Prefill/decode disaggregation"),
        Command::Decode(_) => return not_built("decode", "Prefill/decode disaggregation"),
        Command::Replay { .. } => return not_built("replay", "The replay CLI"),
        Command::Generate(args) => generate::run(args),
        Command::Bench(BenchCommand::Log(args)) => bench_log::run(args),
        Command::Bench(BenchCommand::Engine(args)) => generate::bench_engine(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
