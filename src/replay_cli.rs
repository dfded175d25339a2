//! `tandem replay …` and `tandem bench replay`: the command line of tandem-replay, and the engine side of
//! `replay rerun` (the replay crate compares tokens; the engine lives in tandem-workers, which the binary already
//! links, so replay does not depend on it).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use tandem_replay::audit::{AuditOptions, Rebuild};
use tandem_replay::export::{ExportHeader, ExportWriter};
use tandem_replay::filter::{RequestFilter, RequestSelector, StateFilter};
use tandem_replay::rerun::{RerunComparison, RerunPlan};
use tandem_replay::source::{Progress, ReadRange, Source};
use tandem_replay::stats::{StatsCollector, StatsOptions};
use tandem_replay::text::{bytes, parse_span, parse_wall_time, thousands};
use tandem_replay::timeline::{Timeline, read_request};
use tandem_scheduler::projection::Projection;

use crate::nats_args::NatsArgs;

/// Where to read and which part of the log.
#[derive(clap::Args, Debug)]
pub struct SourceFlags {
    /// Read the TANDEM stream of this nats-server.
    #[arg(long, env = "TANDEM_NATS", global = true)]
    nats: Option<String>,
    #[command(flatten)]
    nats_auth: NatsArgs,
    /// Read the embedded log under this data dir (the one `tandem serve` used; it must not be running).
    #[arg(long, env = "TANDEM_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Read an export file (from `tandem replay export`). Taken first when several sources are given.
    #[arg(long, env = "TANDEM_REPLAY_FILE", global = true)]
    file: Option<PathBuf>,
    /// Start of the window: RFC 3339 (`2026-11-25T19:00:00Z`) or a span back from now (`15m`, `2h`, `1d`).
    #[arg(long, env = "TANDEM_REPLAY_SINCE", global = true)]
    since: Option<String>,
    /// End of the window, in the same forms.
    #[arg(long, env = "TANDEM_REPLAY_UNTIL", global = true)]
    until: Option<String>,
    /// Only this request.
    #[arg(long, env = "TANDEM_REPLAY_REQUEST", global = true)]
    request: Option<String>,
    /// Only requests this worker took part in.
    #[arg(long, env = "TANDEM_REPLAY_WORKER", global = true)]
    worker: Option<String>,
    /// Only requests in this state at the end of the read (`live`, `terminal`, `decoding`, `failed`...).
    #[arg(long, env = "TANDEM_REPLAY_STATE", global = true)]
    state: Option<String>,
    /// No progress lines on stderr.
    #[arg(long, env = "TANDEM_REPLAY_QUIET", global = true)]
    quiet: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    source: SourceFlags,
    #[command(subcommand)]
    command: ReplayCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ReplayCommand {
    /// One request's events in order, with the durations between its phases.
    Timeline {
        /// The request id (as in the response's `id`, without `chatcmpl-`/`cmpl-`).
        id: String,
        /// `table` for people, `json` for scripts.
        #[arg(
            long,
            value_enum,
            env = "TANDEM_REPLAY_FORMAT",
            default_value = "table"
        )]
        format: Format,
        /// Also draw the phases as a Gantt chart: an SVG file, or an HTML page when FILE ends in `.html`.
        #[arg(long, value_name = "FILE", env = "TANDEM_REPLAY_SVG")]
        svg: Option<PathBuf>,
    },
    /// Rebuild the projection from the log and check every request; exits 1 when it finds errors.
    Audit {
        /// Compare with the scheduler's projection (`<data-dir>/scheduler.redb`); the log is read up to the sequence
        /// it last applied.
        #[arg(long, env = "TANDEM_REPLAY_PROJECTION")]
        projection: Option<PathBuf>,
        /// A live request with no event for this long before the end of the log is stuck.
        #[arg(long, env = "TANDEM_REPLAY_STUCK_AFTER", default_value = "5m")]
        stuck_after: String,
        /// `table` for people, `json` for scripts.
        #[arg(
            long,
            value_enum,
            env = "TANDEM_REPLAY_FORMAT",
            default_value = "table"
        )]
        format: Format,
    },
    /// Latency percentiles per phase, prefill split, queue depth, worker load, failures.
    Stats {
        /// `table` for people, `json` for scripts.
        #[arg(
            long,
            value_enum,
            env = "TANDEM_REPLAY_FORMAT",
            default_value = "table"
        )]
        format: Format,
        /// Rows of the queue-depth table.
        #[arg(long, env = "TANDEM_REPLAY_DEPTH_ROWS", default_value_t = 12)]
        depth_rows: usize,
    },
    /// Write the raw events (of the window and filters) to a compressed, self-describing file.
    Export {
        /// The file to write (`.partial` beside it until it is complete).
        #[arg(value_name = "FILE")]
        output: PathBuf,
    },
    /// Execute a logged request again and compare its tokens with the logged ones; exits 1 when they differ.
    Rerun {
        id: String,
        /// A Hugging Face Qwen3 folder, or `builtin` (what `tandem serve` runs with no --model).
        #[arg(long, env = "TANDEM_MODEL", default_value = "builtin")]
        model: String,
        /// Only `cpu`: the backend whose tokens must match the log exactly.
        #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
        device: String,
        /// Tokens per KV block.
        #[arg(long, env = "TANDEM_KV_BLOCK_TOKENS", default_value_t = 16)]
        kv_block_tokens: usize,
        /// `table` for people, `json` for scripts.
        #[arg(
            long,
            value_enum,
            env = "TANDEM_REPLAY_FORMAT",
            default_value = "table"
        )]
        format: Format,
    },
}

#[derive(clap::Args, Debug)]
pub struct BenchReplayArgs {
    /// Events in the synthetic log.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Requests in flight at once in the synthetic log.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Keep the log in this data dir (reused when it already holds one) instead of a temp dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also time the scheduler's redb projection (`Projection::apply_batch`) on the same log.
    #[arg(long)]
    redb: bool,
}

fn progress(flags: &SourceFlags) -> Progress {
    if flags.quiet {
        Progress::quiet()
    } else {
        Progress::stderr()
    }
}

/// A time flag: RFC 3339, or a span back from now.
fn parse_time(flag: &str, text: &str) -> Result<u64> {
    if let Some(at) = parse_wall_time(text) {
        return Ok(at);
    }
    if let Some(span) = parse_span(text) {
        return Ok(tandem_events::event::now_ns().saturating_sub(span));
    }
    bail!(
        "--{flag} {text:?}: use RFC 3339 (2026-11-25T19:00:00Z) or a span back from now (90s, 15m, 2h, 1d)"
    )
}

fn range(flags: &SourceFlags) -> Result<ReadRange> {
    Ok(ReadRange {
        since_ns: flags
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until_ns: flags
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        ..ReadRange::default()
    })
}

fn filter(flags: &SourceFlags) -> Result<RequestFilter> {
    Ok(RequestFilter {
        request_id: flags.request.clone(),
        worker: flags.worker.clone(),
        state: flags.state.as_deref().map(StateFilter::parse).transpose()?,
    })
}

async fn open_source(flags: &SourceFlags) -> Result<Source> {
    if let Some(file) = &flags.file {
        // The error names the file already.
        return Source::file(file).context("reading the export given by --file");
    }
    // A scheduler pod has TANDEM_DATA_DIR (for its projection) and TANDEM_NATS both set: a data dir without an
    // embedded log then defers to the stream.
    if let Some(dir) = &flags.data_dir
        && (dir.join("events.redb").is_file() || flags.nats.is_none())
    {
        return Source::data_dir(dir)
            .with_context(|| format!("opening the embedded log in {}", dir.display()));
    }
    if let Some(url) = &flags.nats {
        return Source::nats_with(url, &flags.nats_auth.connect_options()?)
            .await
            .with_context(|| format!("reading the TANDEM stream at {url}"));
    }
    // What `tandem serve` writes with no flags.
    let default_dir = Path::new("./tandem-data");
    if default_dir.join("events.redb").is_file() {
        return Source::data_dir(default_dir).context("opening the embedded log in ./tandem-data");
    }
    bail!("no log to read: pass --file FILE, --data-dir DIR or --nats URL")
}

fn print(
    format: Format,
    text: impl FnOnce() -> String,
    json: impl FnOnce() -> serde_json::Result<String>,
) -> Result<()> {
    match format {
        Format::Table => print!("{}", text()),
        Format::Json => println!("{}", json().context("writing JSON")?),
    }
    Ok(())
}

/// Runs `tandem replay …`; the exit code says whether findings or a token mismatch were found.
pub fn run(args: ReplayArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: ReplayArgs) -> Result<ExitCode> {
    let flags = &args.source;
    match args.command {
        ReplayCommand::Timeline { id, format, svg } => {
            let source = open_source(flags).await?;
            let messages = read_request(&source, &id, &mut progress(flags)).await?;
            let timeline = Timeline::build(&id, source.description(), &messages);
            if let Some(path) = svg {
                let html = path
                    .extension()
                    .is_some_and(|ext| ext == "html" || ext == "htm");
                let picture = if html {
                    timeline.render_html()
                } else {
                    timeline.render_svg()
                };
                std::fs::write(&path, picture)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            print(
                format,
                || timeline.render_text(),
                || serde_json::to_string_pretty(&timeline),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        ReplayCommand::Audit {
            projection,
            stuck_after,
            format,
        } => {
            let stuck_after_ns = parse_span(&stuck_after).with_context(|| {
                format!("--stuck-after {stuck_after:?}: use a span like 90s, 5m, 1h")
            })?;
            let mut range = range(flags)?;
            let opened = match &projection {
                Some(path) => {
                    if range.since_ns.is_some() {
                        bail!(
                            "--projection compares with a projection of the whole log: drop --since"
                        );
                    }
                    if !path.is_file() {
                        bail!(
                            "no projection at {} (the scheduler keeps it in <data-dir>/scheduler.redb)",
                            path.display()
                        );
                    }
                    let opened = Projection::open(path).with_context(|| {
                        format!(
                            "opening the projection {} (a running scheduler holds it: stop it or copy the file)",
                            path.display()
                        )
                    })?;
                    range.until_sequence = Some(opened.last_applied()?);
                    Some(opened)
                }
                None => None,
            };
            let source = open_source(flags).await?;
            let mut rebuild = Rebuild::new(AuditOptions {
                stuck_after_ns,
                filter: filter(flags)?,
                partial_window: range.since_ns.is_some(),
            });
            source
                .scan(&range, &mut progress(flags), |message| {
                    rebuild.observe(message);
                    Ok(())
                })
                .await?;
            let check = match (&projection, &opened) {
                (Some(path), Some(opened)) => {
                    Some(rebuild.compare_with_projection(opened, &path.display().to_string())?)
                }
                _ => None,
            };
            let mut report = rebuild.finish(source.description());
            if let Some(check) = check {
                report.attach_projection(check);
            }
            print(
                format,
                || report.render_text(),
                || serde_json::to_string_pretty(&report),
            )?;
            Ok(if report.errors() > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        ReplayCommand::Stats { format, depth_rows } => {
            let source = open_source(flags).await?;
            let mut collector = StatsCollector::new(StatsOptions {
                filter: filter(flags)?,
                depth_rows,
            });
            source
                .scan(&range(flags)?, &mut progress(flags), |message| {
                    collector.observe(message);
                    Ok(())
                })
                .await?;
            let report = collector.finish(source.description());
            print(
                format,
                || report.render_text(),
                || serde_json::to_string_pretty(&report),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        ReplayCommand::Export { output } => {
            let source = open_source(flags).await?;
            let range = range(flags)?;
            let filter = filter(flags)?;
            // Which requests a filter selects is known only after a whole read: a first pass finds them.
            let selected = if filter.is_empty() {
                None
            } else {
                let mut selector = RequestSelector::default();
                source
                    .scan(&range, &mut progress(flags), |message| {
                        selector.observe(message);
                        Ok(())
                    })
                    .await?;
                Some(selector.selected(&filter))
            };
            let mut selection = Vec::new();
            if let Some(since) = &flags.since {
                selection.push(format!("since {since}"));
            }
            if let Some(until) = &flags.until {
                selection.push(format!("until {until}"));
            }
            if !filter.is_empty() {
                selection.push(filter.describe());
            }
            let header = ExportHeader::new(source.description(), selection.join(", "));
            let mut writer = ExportWriter::create(&output, &header)?;
            let worker = filter.worker.clone();
            source
                .scan(&range, &mut progress(flags), |message| {
                    let keep = match &selected {
                        None => true,
                        Some(ids) => match message.event() {
                            // A selected request's events, and the selected worker's own events.
                            Ok(event) => {
                                ids.contains(event.id()) || worker.as_deref() == Some(event.id())
                            }
                            Err(_) => false,
                        },
                    };
                    if keep { writer.write(message) } else { Ok(()) }
                })
                .await?;
            let summary = writer.finish()?;
            eprintln!(
                "exported {} messages (up to sequence {}) to {}: {} of events in {}",
                thousands(summary.messages),
                thousands(summary.last_sequence),
                output.display(),
                bytes(summary.payload_bytes),
                bytes(summary.file_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        ReplayCommand::Rerun {
            id,
            model,
            device,
            kv_block_tokens,
            format,
        } => {
            if device != "cpu" {
                bail!(
                    "--device {device}: rerun runs on cpu, the backend whose tokens must match the log exactly"
                );
            }
            let source = open_source(flags).await?;
            let messages = read_request(&source, &id, &mut progress(flags)).await?;
            let plan = RerunPlan::from_messages(&id, &messages)?;
            let produced = execute(&plan, &model, kv_block_tokens)?;
            let comparison =
                RerunComparison::compare(&plan, &produced, &format!("cpu, model {model}"));
            print(
                format,
                || comparison.render_text(),
                || serde_json::to_string_pretty(&comparison),
            )?;
            Ok(if comparison.identical {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Runs the logged request on the CPU engine, as a decode worker would: same prompt, same sampling, as many
/// tokens as were logged.
fn execute(plan: &RerunPlan, model: &str, kv_block_tokens: usize) -> Result<Vec<u32>> {
    let weights = if model == "builtin" {
        tandem_workers::builtin_model()
    } else {
        tandem_workers::load_model(Path::new(model))
            .with_context(|| format!("loading the model in {model}"))?
    };
    let tokens = plan.prompt_token_ids.len() + plan.tokens_to_generate();
    let config = tandem_workers::EngineConfig {
        block_size_tokens: kv_block_tokens,
        num_blocks: tokens.div_ceil(kv_block_tokens.max(1)) + 16,
        prefill_chunk_tokens: 512,
        prefix_caching: true,
    };
    let mut engine =
        tandem_workers::Engine::cpu(weights, config).context("starting the CPU engine")?;
    let wire = &plan.sampling;
    let params = tandem_workers::SamplingParams {
        max_tokens: plan.tokens_to_generate(),
        temperature: wire.temperature,
        top_k: wire.top_k as usize,
        // 0 on the wire means "not set", as the decode worker reads it.
        top_p: if wire.top_p > 0.0 { wire.top_p } else { 1.0 },
        seed: wire.seed,
        stop_token_ids: wire.stop_token_ids.clone(),
        logprobs: None,
    };
    let generation = engine
        .generate(&plan.prompt_token_ids, &params)
        .with_context(|| format!("re-executing request {}", plan.request_id))?;
    Ok(generation.token_ids)
}

/// `tandem bench replay`: writes a synthetic log to an embedded data dir, then times reading it, rebuilding the
/// projection in memory (what `replay audit` does), and optionally the scheduler's redb projection.
pub fn bench(args: BenchReplayArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let temp = tempfile::tempdir().context("creating a temp dir")?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("log"));
    let figures = runtime
        .block_on(tandem_replay::bench::run(
            &dir,
            args.events,
            args.concurrency,
            args.redb,
        ))
        .with_context(|| format!("benchmarking replay on the log in {}", dir.display()))?;
    print!("{}", figures.render_text());
    Ok(())
}
