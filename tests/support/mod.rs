//! Test support for end-to-end tests: a `tandem` process on a free loopback port, and plain HTTP/1.1 to it.
//! One place for these helpers, used by every end-to-end test.

#![allow(dead_code)] // each test binary uses a different subset

pub mod telemetry;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The seed's request message: 25 prompt tokens with the Qwen3 chat template (see assets/qwen3-tokenizer/SOURCE.md).
pub const SEED_MESSAGE: &str =
    "Explain why Roger Federer is considered one of the greatest tennis players of all time";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// A `tandem serve` process; stopped with SIGINT (a clean shutdown) on `stop`, killed on drop.
pub struct TandemServe {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
    log_path: PathBuf,
}

impl TandemServe {
    /// Starts `tandem serve` with `extra_args` and waits until `/ready` answers 200.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> TandemServe {
        TandemServe::start_with_env(data_dir, extra_args, &[])
    }

    /// [`TandemServe::start`] with environment variables set for the process.
    pub fn start_with_env(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> TandemServe {
        let port = free_port();
        let log_path = data_dir.with_extension("log");
        let log_file = std::fs::File::create(&log_path).expect("server log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("tandem binary starts");
        let mut server = TandemServe {
            child: Some(child),
            port,
            data_dir: data_dir.to_path_buf(),
            log_path,
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            if let Ok((200, _)) = server.try_get("/ready") {
                return server;
            }
            let exited = server
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "tandem serve exited ({status}) before it was ready; its log:\n{}",
                    server.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "tandem serve never became ready; its log:\n{}",
            server.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        request(self.port, "GET", path, None)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        request(self.port, "GET", path, None).expect("GET")
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) =
            request(self.port, "POST", path, Some(&body.to_string())).expect("POST");
        let json =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, json)
    }

    /// Sends SIGINT, as Ctrl-C does, and waits for a clean exit.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let interrupted = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(interrupted.success());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "tandem serve exited with {status}; log:\n{}",
                    self.log()
                );
                return;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!(
                    "tandem serve did not stop after SIGINT; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TandemServe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the (de-chunked) body.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    request_with_headers(port, method, path, body, &[])
}

/// [`request`] with extra request headers.
pub fn request_with_headers(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {extra}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(stream);
    let (status, chunked) = read_head(&mut reader)?;
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    Ok((status, if chunked { dechunk(&text) } else { text }))
}

/// Opens a streaming request and returns the reader positioned at the body, for SSE tests.
pub fn open_stream(port: u16, path: &str, body: &serde_json::Value) -> (u16, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader).expect("response head");
    (status, reader)
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if line.to_ascii_lowercase().starts_with("transfer-encoding:")
            && line.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

fn dechunk(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// Every request on the log, with its events in log order, checked by the lifecycle state machine; returns each
/// request's final state.
pub fn lifecycle_states(
    messages: &[tandem_events::log::LogMessage],
) -> std::collections::BTreeMap<String, tandem_events::lifecycle::RequestState> {
    use tandem_events::lifecycle::check_sequence;
    let mut by_request: std::collections::BTreeMap<String, Vec<tandem_events::Body>> =
        Default::default();
    for message in messages {
        let event = message
            .event()
            .unwrap_or_else(|error| panic!("event {}: {error}", message.sequence));
        if !event.kind().is_worker_event() {
            by_request
                .entry(event.id().to_string())
                .or_default()
                .push(event.body().clone());
        }
    }
    by_request
        .into_iter()
        .map(|(request_id, bodies)| {
            let kinds: Vec<_> = bodies.iter().map(|body| body.kind()).collect();
            let state = check_sequence(&bodies).unwrap_or_else(|(index, violation)| {
                panic!("{request_id} {kinds:?}: event {index}: {violation}")
            });
            (request_id, state)
        })
        .collect()
}

/// Every message of the embedded log under `data_dir` (its server stopped), in sequence order.
pub fn read_embedded_log(data_dir: &Path) -> Vec<tandem_events::log::LogMessage> {
    use tandem_events::log::EventLog;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let log = tandem_events::log::embedded::EmbeddedLog::open(data_dir).unwrap();
        log.read(tandem_events::log::StartAt::Beginning, &[], 100_000)
            .await
            .unwrap()
    })
}

/// The first `KvTransferred` on the log.
pub fn first_kv_transferred(
    messages: &[tandem_events::log::LogMessage],
) -> tandem_events::schema::KvTransferred {
    messages
        .iter()
        .filter_map(|message| message.event().ok())
        .find_map(|event| match event.body() {
            tandem_events::Body::KvTransferred(body) => Some(body.clone()),
            _ => None,
        })
        .expect("a KvTransferred event")
}

/// Waits until every one of `worker_ids` heartbeats in the JetStream server at `url`, then 1.2 s more: a decode
/// worker sends prompts away only once it has seen a live prefill worker, and it looks every second.
pub fn wait_for_workers(url: &str, worker_ids: &[&str]) {
    use tandem_events::log::EventLog;
    use tandem_events::subjects::{WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let log = tandem_events::log::jetstream::JetStreamLog::connect(url)
            .await
            .unwrap();
        let workers = log
            .kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL)
            .await
            .unwrap();
        let started = Instant::now();
        loop {
            let keys = workers.keys().await.unwrap();
            if worker_ids.iter().all(|id| keys.iter().any(|key| key == id)) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "workers {worker_ids:?} never came up (seen: {keys:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    std::thread::sleep(Duration::from_millis(1200));
}

/// The kinds of one request's events, in log order.
pub fn kinds_of(
    messages: &[tandem_events::log::LogMessage],
    request_id: &str,
) -> Vec<tandem_events::EventKind> {
    messages
        .iter()
        .filter_map(|message| message.event().ok())
        .filter(|event| event.id() == request_id)
        .map(|event| event.kind())
        .collect()
}

/// A `tandem` process running one role (`gateway`, `scheduler`, `prefill`, `decode`); killed on drop.
pub struct TandemRole {
    child: Option<Child>,
    pub name: String,
    log_path: PathBuf,
}

impl TandemRole {
    pub fn spawn(name: &str, args: &[&str], log_dir: &Path) -> TandemRole {
        TandemRole::spawn_with_env(name, args, &[], log_dir)
    }

    /// Like `spawn`, with environment variables set for the process (as a manifest sets them for a container).
    pub fn spawn_with_env(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> TandemRole {
        let log_path = log_dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log_path).expect("role log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            // Roles with a health endpoint take their own free loopback port, so several workers (and parallel
            // tests) never collide on the default one; a test that needs the port passes --http-port itself.
            .env("TANDEM_HTTP_HOST", "127.0.0.1")
            .env("TANDEM_HTTP_PORT", "0")
            // A role's own data dir unless the test names one: parallel tests must not share `./tandem-data` (a
            // second scheduler would find the first one's projection locked).
            .env("TANDEM_DATA_DIR", log_dir.join(format!("{name}-data")))
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("tandem binary starts");
        TandemRole {
            child: Some(child),
            name: name.to_string(),
            log_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The exit status, once the process has ended (`None` while it runs).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// SIGKILL: the process dies with whatever it holds.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("wait");
        }
    }

    /// SIGINT and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "{} exited with {status}; log:\n{}",
                        self.name,
                        self.log()
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            panic!(
                "{} did not stop after SIGINT; log:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

impl Drop for TandemRole {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test's temporary folder goes with it: the end of each role's log is the only trace left.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} lines of {}'s log ---\n{}",
                tail.len(),
                self.name,
                tail.join("\n")
            );
        }
    }
}

/// Waits until `GET path` on `port` answers 200.
pub fn wait_ready(port: u16, path: &str, what: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if let Ok((200, _)) = request(port, "GET", path, None) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} never became ready");
}
