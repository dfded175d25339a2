//! The health endpoint of the roles that serve no API of their own (`tandem decode`, `tandem prefill`), for
//! Kubernetes probes: `GET /health` answers 200 while the process runs (liveness), `GET /ready` answers 200 once the
//! worker has joined the fleet with its engine loaded and 503 before that and while it shuts down (readiness). Also
//! the `--http-host`/`--http-port` flags of every non-gateway role, each with its own default port; the scheduler
//! serves the same two paths beside its query API, the gateway on its API port. Every role's port also serves
//! `GET /metrics` (Prometheus, `crate::telemetry`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

/// Where the scheduler's query API and health endpoint listen (see [`DecodeHttpArgs`]).
#[derive(clap::Args, Clone, Debug)]
pub struct SchedulerHttpArgs {
    /// Address of the query API and health endpoint (`GET /requests`, `/workers`, `/audit`, `/health`, `/ready`).
    #[arg(long, env = "TANDEM_HTTP_HOST", default_value = "0.0.0.0")]
    pub http_host: String,
    /// Port of the query API and health endpoint.
    #[arg(long, env = "TANDEM_HTTP_PORT", default_value_t = 8001)]
    pub http_port: u16,
}

/// Where the decode worker's health endpoint listens. Each role has its own default port (scheduler 8001, decode
/// 8002, prefill 8003; the gateway's API is 8000) so that roles sharing a host or a pod never collide. (One struct
/// per role rather than a const-generic one: clap's `default_value_t` keeps its rendered default in a static that
/// every instantiation would share.)
#[derive(clap::Args, Clone, Debug)]
pub struct DecodeHttpArgs {
    /// Address of the health endpoint (`GET /health`, `GET /ready`).
    #[arg(long, env = "TANDEM_HTTP_HOST", default_value = "0.0.0.0")]
    pub http_host: String,
    /// Port of the health endpoint (`GET /health`, `GET /ready`).
    #[arg(long, env = "TANDEM_HTTP_PORT", default_value_t = 8002)]
    pub http_port: u16,
}

/// Where the prefill worker's health endpoint listens (see [`DecodeHttpArgs`]).
#[derive(clap::Args, Clone, Debug)]
pub struct PrefillHttpArgs {
    /// Address of the health endpoint (`GET /health`, `GET /ready`).
    #[arg(long, env = "TANDEM_HTTP_HOST", default_value = "0.0.0.0")]
    pub http_host: String,
    /// Port of the health endpoint (`GET /health`, `GET /ready`).
    #[arg(long, env = "TANDEM_HTTP_PORT", default_value_t = 8003)]
    pub http_port: u16,
}

/// Where a worker is in its life, as `/ready` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Loading the engine and joining the fleet: not ready.
    Starting = 0,
    /// Joined, engine loaded: ready for work.
    Ready = 1,
    /// Draining its requests before leaving: not ready, so no new traffic is sent its way.
    Stopping = 2,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            1 => Phase::Ready,
            2 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }
}

/// A running health endpoint; the role moves it through starting → ready → stopping.
pub struct RoleHttpServer {
    phase: Arc<AtomicU8>,
    local_address: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RoleHttpServer {
    /// Binds `host:port` and serves `/health` and `/ready` (not ready yet) in the background. Start it before the
    /// engine loads, so liveness passes while a large model is read.
    pub async fn start(role: &'static str, host: &str, port: u16) -> Result<RoleHttpServer> {
        let address = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| {
                format!(
                    "the {role} health endpoint cannot listen on {address} (is the port taken? pass --http-port)"
                )
            })?;
        let local_address = listener
            .local_addr()
            .with_context(|| format!("the address of the {role} health endpoint"))?;
        let phase = Arc::new(AtomicU8::new(Phase::Starting as u8));
        let router = Router::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .with_state(Arc::clone(&phase))
            .merge(crate::telemetry::metrics_router());
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                })
                .await
        });
        tracing::info!(%local_address, role, "health endpoint listening (GET /health, GET /ready, GET /metrics)");
        Ok(RoleHttpServer {
            phase,
            local_address,
            stop,
            task,
        })
    }

    /// The address it listens on (the port the OS picked when 0 was asked).
    #[cfg(test)]
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// The worker has joined the fleet and its engine is loaded: `/ready` answers 200.
    pub fn mark_ready(&self) {
        self.phase.store(Phase::Ready as u8, Ordering::Relaxed);
        tracing::info!(address = %self.local_address, "ready: GET /ready answers 200");
    }

    /// The worker is draining before it leaves: `/ready` answers 503 so no new traffic comes; `/health` stays 200
    /// so the drain is not cut short by a liveness restart.
    pub fn mark_stopping(&self) {
        self.phase.store(Phase::Stopping as u8, Ordering::Relaxed);
    }

    /// Stops listening and waits for the answers in flight.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task
            .await
            .context("the health endpoint task panicked")?
            .context("the health endpoint failed")
    }
}

/// 200 while the process runs (liveness).
async fn health() -> &'static str {
    "ok\n"
}

/// 200 once joined with the engine loaded, else 503 with the reason (readiness).
async fn ready(State(phase): State<Arc<AtomicU8>>) -> (StatusCode, &'static str) {
    match Phase::from_u8(phase.load(Ordering::Relaxed)) {
        Phase::Ready => (StatusCode::OK, "ready\n"),
        Phase::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: loading the engine and joining the fleet\n",
        ),
        Phase::Stopping => (
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping: finishing the requests in flight\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One `GET` over a fresh connection; the status code and the body.
    async fn get(address: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn ready_follows_the_phase_and_health_stays_up() {
        let server = RoleHttpServer::start("decode", "127.0.0.1", 0)
            .await
            .unwrap();
        let address = server.local_address();
        assert_eq!(get(address, "/health").await, (200, "ok\n".to_string()));
        let (status, body) = get(address, "/ready").await;
        assert_eq!(status, 503);
        assert!(body.starts_with("starting"), "{body}");

        server.mark_ready();
        assert_eq!(get(address, "/ready").await, (200, "ready\n".to_string()));

        server.mark_stopping();
        let (status, body) = get(address, "/ready").await;
        assert_eq!(status, 503);
        assert!(body.starts_with("stopping"), "{body}");
        assert_eq!(get(address, "/health").await.0, 200);
        // No recorder in this test process: `/metrics` is served and says so.
        let (status, body) = get(address, "/metrics").await;
        assert_eq!(status, 404);
        assert!(body.contains("no metrics"), "{body}");

        server.stop().await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "the port is closed after stop"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_that_names_the_flag() {
        let first = RoleHttpServer::start("prefill", "127.0.0.1", 0)
            .await
            .unwrap();
        let taken = first.local_address().port();
        let error = RoleHttpServer::start("prefill", "127.0.0.1", taken)
            .await
            .err()
            .expect("the second bind fails");
        let message = format!("{error:#}");
        assert!(message.contains("--http-port"), "{message}");
        first.stop().await.unwrap();
    }
}
