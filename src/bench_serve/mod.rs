//! `tandem bench serve`: an open-loop load generator for any OpenAI-compatible server (or, with `--direct`, for the
//! decode worker's engine loop in this process). Requests arrive as a Poisson process at `--request-rate` (or all at
//! once), at most `--max-concurrency` in flight; it reports request and token throughput, TTFT / TPOT / ITL / E2E
//! percentiles and goodput against SLOs, as a table and as JSON.
//!
//! - `workload`: token-exact synthetic prompts; `http`: the streaming chat client; `direct`: the in-process engine;
//! - `report`: the figures, the table, the JSON with the machine, commit and command line.

mod direct;
mod http;
mod report;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::roles::{self, ModelArgs};
use direct::DirectTarget;
use http::HttpTarget;
use report::{Slos, Summary};

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// The server's base URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    base_url: String,
    /// The chat completions path under --base-url.
    #[arg(long, default_value = "/v1/chat/completions")]
    endpoint: String,
    /// No server: drive the decode worker's engine loop in this process (model flags as for `tandem serve`), to
    /// see what HTTP, the log and the scheduler add.
    #[arg(long)]
    direct: bool,
    /// Requests measured.
    #[arg(long, default_value_t = 200)]
    num_requests: usize,
    /// Mean arrivals per second (a Poisson process); `inf` sends them all at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// Most requests in flight; a request that arrives beyond it waits (its latencies start when it is sent).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Tokens of each user message (the chat template adds its own; the server's count is in the results).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens to generate per request (`max_completion_tokens`).
    #[arg(long, default_value_t = 32)]
    output_len: u32,
    /// Share of each message's tokens that are the same in every request (a shared prefix the cache can reuse).
    #[arg(long, default_value_t = 0.0)]
    shared_prefix_ratio: f64,
    /// Ask the server to keep generating past EOS, so every answer has --output-len tokens (`ignore_eos`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ignore_eos: bool,
    /// Sampling temperature sent with each request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: the smallest set of most likely tokens whose probability reaches this (1: no limit).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the prompts and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests sent one by one before measuring (they load what is loaded lazily; not counted).
    #[arg(long, default_value_t = 2)]
    warmup_requests: usize,
    /// A request counts toward goodput only with a TTFT at most this.
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// A request counts toward goodput only with a TPOT at most this.
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// A name for this run in the table and the JSON (e.g. `aggregated-embedded`).
    #[arg(long)]
    label: Option<String>,
    /// Also write the results here as JSON (convention: `bench/results/<date>-<label>.json`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tokenizer (and, with --direct, the model) as for `tandem serve`; --served-model-name is the model asked for.
    #[command(flatten)]
    model: ModelArgs,
}

/// What every request asks for besides its prompt.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub output_len: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub ignore_eos: bool,
}

/// How one request went, in milliseconds from when it was sent.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    pub ttft_ms: f64,
    pub e2e_ms: f64,
    /// Gaps between successive streamed chunks.
    pub itl_ms: Vec<f64>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub error: Option<String>,
}

impl RequestOutcome {
    /// A request that finished: its first and last arrival, and every chunk's arrival (for the gaps between them).
    fn finished(
        ttft_ms: f64,
        e2e_ms: f64,
        arrivals_ms: &[f64],
        prompt_tokens: u64,
        output_tokens: u64,
    ) -> RequestOutcome {
        RequestOutcome {
            ttft_ms,
            e2e_ms,
            itl_ms: arrivals_ms
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .collect(),
            prompt_tokens,
            output_tokens,
            error: None,
        }
    }

    fn failed(error: String) -> RequestOutcome {
        RequestOutcome {
            ttft_ms: 0.0,
            e2e_ms: 0.0,
            itl_ms: Vec::new(),
            prompt_tokens: 0,
            output_tokens: 0,
            error: Some(error),
        }
    }
}

/// Where the load goes, with each request's prompt in the form that target takes.
#[allow(
    clippy::large_enum_variant,
    reason = "one value per run, behind an Arc: its size costs nothing"
)]
enum Target {
    Http(HttpTarget),
    Direct(DirectTarget),
}

enum PreparedPrompt {
    Content(String),
    TokenIds(Vec<u32>),
}

impl Target {
    fn prepare(&self, prompt: workload::Prompt) -> Result<PreparedPrompt> {
        match self {
            Target::Http(_) => Ok(PreparedPrompt::Content(prompt.content)),
            Target::Direct(direct) => Ok(PreparedPrompt::TokenIds(
                direct.prompt_ids(&prompt.content)?,
            )),
        }
    }

    async fn send(&self, prompt: PreparedPrompt, sampling: &Sampling) -> RequestOutcome {
        match (self, prompt) {
            (Target::Http(http), PreparedPrompt::Content(content)) => {
                http.send(&content, sampling).await
            }
            (Target::Direct(direct), PreparedPrompt::TokenIds(ids)) => {
                direct.send(ids, sampling).await
            }
            _ => RequestOutcome::failed("a prompt prepared for another target".into()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Http(http) => http.describe(),
            Target::Direct(_) => "direct: the decode worker's engine loop in-process".into(),
        }
    }
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    // NaN is refused too.
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        bail!("--request-rate must be above 0 (or inf)");
    }
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    if args.output_len == 0 {
        bail!("--output-len must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: ServeBenchArgs) -> Result<()> {
    let tokenizer = workload::load_tokenizer(&roles::tokenizer_dir(&args.model)?)?;
    let prompts = workload::synthetic_prompts(
        &tokenizer,
        args.warmup_requests + args.num_requests,
        args.input_len,
        args.shared_prefix_ratio,
        args.seed,
    )?;
    let target = if args.direct {
        Target::Direct(DirectTarget::start(&args.model)?)
    } else {
        Target::Http(HttpTarget::new(
            &args.base_url,
            &args.endpoint,
            &args.model.served_model_name,
        )?)
    };
    let target = Arc::new(target);
    let mut prepared = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        prepared.push(target.prepare(prompt)?);
    }
    let measured = prepared.split_off(args.warmup_requests);
    let sampling = Arc::new(Sampling {
        output_len: args.output_len,
        temperature: args.temperature,
        top_p: args.top_p,
        ignore_eos: args.ignore_eos,
    });
    for (index, prompt) in prepared.into_iter().enumerate() {
        let outcome = target.send(prompt, &sampling).await;
        if let Some(error) = outcome.error {
            bail!(
                "warm-up request {index} to {} failed: {error}",
                target.describe()
            );
        }
    }

    let progress = ProgressBar::new(measured.len() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} requests {per_sec}")
    {
        progress.set_style(style.progress_chars("=> "));
    }
    let limit = args
        .max_concurrency
        .map(|limit| Arc::new(Semaphore::new(limit)));
    let mut arrivals = SmallRng::seed_from_u64(args.seed ^ 0x5eed_a771_7a15);
    let mut requests = JoinSet::new();
    let started = Instant::now();
    let mut next_arrival = tokio::time::Instant::now();
    for prompt in measured {
        if args.request_rate.is_finite() {
            // Exponential gaps: a Poisson process of rate --request-rate, open loop (arrivals never wait for answers).
            let uniform: f64 = arrivals.random();
            let gap_s = -(1.0 - uniform).ln() / args.request_rate;
            next_arrival += Duration::from_secs_f64(gap_s);
            tokio::time::sleep_until(next_arrival).await;
        }
        let target = Arc::clone(&target);
        let sampling = Arc::clone(&sampling);
        let limit = limit.clone();
        let progress = progress.clone();
        requests.spawn(async move {
            let _permit = match &limit {
                Some(limit) => Some(limit.acquire().await),
                None => None,
            };
            let outcome = target.send(prompt, &sampling).await;
            progress.inc(1);
            outcome
        });
    }
    let mut outcomes = Vec::with_capacity(args.num_requests);
    while let Some(outcome) = requests.join_next().await {
        outcomes.push(outcome.context("a request task panicked")?);
    }
    let duration_s = started.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let slos = Slos {
        ttft_ms: args.slo_ttft_ms,
        tpot_ms: args.slo_tpot_ms,
    };
    let summary = Summary::of(&outcomes, duration_s, slos);
    let label = args.label.clone().unwrap_or_else(|| {
        if args.direct {
            "direct".into()
        } else {
            "serve".into()
        }
    });
    print!(
        "{}",
        summary.table(&format!("Serving Benchmark Result: {label}"))
    );
    if let Some(path) = &args.json {
        let mut document = report::provenance();
        document["schema"] = "tandem-bench-serve/1".into();
        document["label"] = label.into();
        document["target"] = target.describe().into();
        document["config"] = serde_json::json!({
            "num_requests": args.num_requests,
            "request_rate": if args.request_rate.is_finite() {
                serde_json::json!(args.request_rate)
            } else {
                serde_json::json!("inf")
            },
            "max_concurrency": args.max_concurrency,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "shared_prefix_ratio": args.shared_prefix_ratio,
            "ignore_eos": args.ignore_eos,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "warmup_requests": args.warmup_requests,
            "model": args.model.model.as_ref().map_or("builtin".into(), |path| path.display().to_string()),
        });
        document["results"] = summary.to_json(slos);
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(&document)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Ok(Target::Direct(direct)) = Arc::try_unwrap(target) {
        direct.shutdown();
    }
    Ok(())
}
