//! The figures of one `tandem bench serve` run: latency percentiles, throughput and goodput from the requests'
//! outcomes, printed as a table and written as JSON (`bench/results/*.json`: with the machine, the commit, the
//! command line and the time, so runs can be compared across commits).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::RequestOutcome;

/// Latency objectives a request must meet to count toward goodput.
#[derive(Debug, Clone, Copy)]
pub struct Slos {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

/// Mean and percentiles of one latency, in milliseconds; `None` without samples.
#[derive(Debug, Clone, Copy)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub samples: usize,
}

impl Distribution {
    fn of(mut samples_ms: Vec<f64>) -> Option<Distribution> {
        if samples_ms.is_empty() {
            return None;
        }
        samples_ms.sort_by(f64::total_cmp);
        Some(Distribution {
            mean: samples_ms.iter().sum::<f64>() / samples_ms.len() as f64,
            p50: percentile(&samples_ms, 50.0),
            p90: percentile(&samples_ms, 90.0),
            p99: percentile(&samples_ms, 99.0),
            samples: samples_ms.len(),
        })
    }

    fn to_json(this: Option<Distribution>) -> Value {
        match this {
            None => Value::Null,
            Some(distribution) => json!({
                "mean": round3(distribution.mean),
                "p50": round3(distribution.p50),
                "p90": round3(distribution.p90),
                "p99": round3(distribution.p99),
                "samples": distribution.samples,
            }),
        }
    }
}

/// Linear interpolation between the closest ranks (numpy's default, which vLLM's benchmark uses too).
fn percentile(sorted: &[f64], percent: f64) -> f64 {
    let rank = percent / 100.0 * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// What a run measured.
#[derive(Debug)]
pub struct Summary {
    pub completed: usize,
    pub failed: usize,
    /// The first few failures' messages.
    pub errors: Vec<String>,
    pub duration_s: f64,
    pub total_prompt_tokens: u64,
    pub total_output_tokens: u64,
    pub ttft: Option<Distribution>,
    pub tpot: Option<Distribution>,
    pub itl: Option<Distribution>,
    pub e2e: Option<Distribution>,
    /// Completed requests that met every SLO given; `None` when no SLO was given.
    pub good_requests: Option<usize>,
}

impl Summary {
    pub fn of(outcomes: &[RequestOutcome], duration_s: f64, slos: Slos) -> Summary {
        let completed: Vec<&RequestOutcome> = outcomes
            .iter()
            .filter(|outcome| outcome.error.is_none())
            .collect();
        let errors = outcomes
            .iter()
            .filter_map(|outcome| outcome.error.clone())
            .take(5)
            .collect();
        let tpot_ms = |outcome: &RequestOutcome| {
            // Time per output token after the first; undefined for a one-token answer.
            (outcome.output_tokens > 1)
                .then(|| (outcome.e2e_ms - outcome.ttft_ms) / (outcome.output_tokens - 1) as f64)
        };
        let good_requests = (slos.ttft_ms.is_some() || slos.tpot_ms.is_some()).then(|| {
            completed
                .iter()
                .filter(|outcome| {
                    slos.ttft_ms.is_none_or(|slo| outcome.ttft_ms <= slo)
                        && slos
                            .tpot_ms
                            .is_none_or(|slo| tpot_ms(outcome).is_none_or(|tpot| tpot <= slo))
                })
                .count()
        });
        Summary {
            completed: completed.len(),
            failed: outcomes.len() - completed.len(),
            errors,
            duration_s,
            total_prompt_tokens: completed.iter().map(|o| o.prompt_tokens).sum(),
            total_output_tokens: completed.iter().map(|o| o.output_tokens).sum(),
            ttft: Distribution::of(completed.iter().map(|o| o.ttft_ms).collect()),
            tpot: Distribution::of(completed.iter().filter_map(|o| tpot_ms(o)).collect()),
            itl: Distribution::of(
                completed
                    .iter()
                    .flat_map(|o| o.itl_ms.iter().copied())
                    .collect(),
            ),
            e2e: Distribution::of(completed.iter().map(|o| o.e2e_ms).collect()),
            good_requests,
        }
    }

    fn per_second(&self, count: f64) -> f64 {
        if self.duration_s > 0.0 {
            count / self.duration_s
        } else {
            0.0
        }
    }

    /// The human-readable table, vLLM's layout.
    pub fn table(&self, title: &str) -> String {
        let mut out = String::new();
        let line = |out: &mut String, name: &str, value: String| {
            out.push_str(&format!("{name:<40}{value:>12}\n"));
        };
        out.push_str(&format!("{:=^52}\n", format!(" {title} ")));
        line(&mut out, "Successful requests:", self.completed.to_string());
        line(&mut out, "Failed requests:", self.failed.to_string());
        line(
            &mut out,
            "Benchmark duration (s):",
            format!("{:.2}", self.duration_s),
        );
        line(
            &mut out,
            "Total input tokens:",
            self.total_prompt_tokens.to_string(),
        );
        line(
            &mut out,
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        line(
            &mut out,
            "Request throughput (req/s):",
            format!("{:.2}", self.per_second(self.completed as f64)),
        );
        line(
            &mut out,
            "Output token throughput (tok/s):",
            format!("{:.2}", self.per_second(self.total_output_tokens as f64)),
        );
        if let Some(good) = self.good_requests {
            line(
                &mut out,
                "Request goodput (req/s):",
                format!("{:.2}", self.per_second(good as f64)),
            );
        }
        for (name, distribution) in [
            ("Time to First Token", self.ttft),
            ("Time per Output Token (excl. 1st token)", self.tpot),
            ("Inter-token Latency (between chunks)", self.itl),
            ("End-to-end Latency", self.e2e),
        ] {
            out.push_str(&format!("{:-^52}\n", name));
            let short = match name {
                "Time to First Token" => "TTFT",
                "End-to-end Latency" => "E2E",
                "Inter-token Latency (between chunks)" => "ITL",
                _ => "TPOT",
            };
            match distribution {
                None => line(&mut out, &format!("{short} (ms):"), "n/a".into()),
                Some(d) => {
                    line(
                        &mut out,
                        &format!("Mean {short} (ms):"),
                        format!("{:.3}", d.mean),
                    );
                    line(
                        &mut out,
                        &format!("P50 {short} (ms):"),
                        format!("{:.3}", d.p50),
                    );
                    line(
                        &mut out,
                        &format!("P90 {short} (ms):"),
                        format!("{:.3}", d.p90),
                    );
                    line(
                        &mut out,
                        &format!("P99 {short} (ms):"),
                        format!("{:.3}", d.p99),
                    );
                }
            }
        }
        if !self.errors.is_empty() {
            out.push_str(&format!("{:-^52}\n", "First errors"));
            for error in &self.errors {
                out.push_str(&format!("{error}\n"));
            }
        }
        out.push_str(&format!("{:=^52}\n", ""));
        out
    }

    pub fn to_json(&self, slos: Slos) -> Value {
        json!({
            "completed": self.completed,
            "failed": self.failed,
            "errors": self.errors,
            "duration_s": round3(self.duration_s),
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens,
            "mean_prompt_tokens": if self.completed > 0 {
                round3(self.total_prompt_tokens as f64 / self.completed as f64)
            } else { 0.0 },
            "request_throughput_req_s": round3(self.per_second(self.completed as f64)),
            "output_throughput_tok_s": round3(self.per_second(self.total_output_tokens as f64)),
            "goodput_req_s": self.good_requests.map(|good| round3(self.per_second(good as f64))),
            "slo_ttft_ms": slos.ttft_ms,
            "slo_tpot_ms": slos.tpot_ms,
            "ttft_ms": Distribution::to_json(self.ttft),
            "tpot_ms": Distribution::to_json(self.tpot),
            "itl_ms": Distribution::to_json(self.itl),
            "e2e_ms": Distribution::to_json(self.e2e),
        })
    }
}

/// Where a figure was measured: the machine, the commit, the command line, the time (UTC).
pub fn provenance() -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            cpuinfo
                .lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        });
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]);
    // Uncommitted changes to tracked files make the commit an approximation of what ran.
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    let command: Vec<String> = std::env::args().collect();
    json!({
        "timestamp_utc": utc_timestamp(SystemTime::now()),
        "commit": commit,
        "commit_dirty": dirty,
        "command": shell_words(&command),
        "machine": {
            "cpu_model": cpu_model,
            "cores": cores,
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
    })
}

/// The command line as one string a shell would run again.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|arg| {
            if !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c))
            {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: Howard Hinnant's algorithm).
fn utc_timestamp(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let sorted: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 51.0);
        assert_eq!(percentile(&sorted, 99.0), 100.0);
        assert_eq!(percentile(&[2.0, 4.0], 50.0), 3.0);
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let time = UNIX_EPOCH + Duration::from_secs(1_764_109_800);
        assert_eq!(utc_timestamp(time), "2025-11-25T22:30:00Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn goodput_counts_requests_within_every_slo() {
        let outcome = |ttft_ms: f64, e2e_ms: f64| RequestOutcome {
            ttft_ms,
            e2e_ms,
            itl_ms: vec![],
            prompt_tokens: 10,
            output_tokens: 5,
            error: None,
        };
        let outcomes = [outcome(5.0, 25.0), outcome(50.0, 70.0), outcome(5.0, 405.0)];
        let slos = Slos {
            ttft_ms: Some(10.0),
            tpot_ms: Some(10.0),
        };
        let summary = Summary::of(&outcomes, 1.0, slos);
        assert_eq!(summary.good_requests, Some(1));
        assert_eq!(summary.total_output_tokens, 15);
        let tpot = summary.tpot.expect("tpot samples");
        assert_eq!(tpot.samples, 3);
        assert_eq!(tpot.p50, 5.0);
    }
}
