//! NATS authentication and TLS, end to end: tandem's roles (and `tandem bench log`) as processes against a
//! nats-server that requires user/password or nkey authentication, one that requires a token, and one that
//! requires TLS with client certificates from a CA this test generates. With the right credentials a request
//! completes; with wrong or missing ones a role stops at start with a message that names the method and the URL.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use support::{TandemRole, TandemServe, free_port, request, wait_ready};
use tandem_events::nats_server::NatsServer;

/// A completion of a few tokens through the gateway on `port`; the request's id.
fn complete(port: u16) -> String {
    let body = json!({"model": "qwen3", "prompt": [1000, 2000, 3000, 4000], "max_tokens": 4, "temperature": 0})
        .to_string();
    let (status, text) = request(port, "POST", "/v1/completions", Some(&body)).expect("POST");
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{text}");
    answer["id"].as_str().expect("an id").to_string()
}

/// Runs `tandem args…` with `env` and waits for it to exit; it must exit non-zero, and its stderr is returned.
/// A role that kept retrying a refused connection would never exit: the bound is far above a failed handshake.
fn run_to_failure(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .envs(env.iter().copied())
        .env("TANDEM_HTTP_HOST", "127.0.0.1")
        .env("TANDEM_HTTP_PORT", "0")
        .env("TANDEM_PORT", free_port().to_string())
        .env(
            "TANDEM_DATA_DIR",
            std::env::temp_dir().join("tandem-nats-security-unused"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tandem starts");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "`tandem {}` was still running after 60 s: it must stop at start",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        !output.status.success(),
        "`tandem {}` succeeded; stderr:\n{stderr}",
        args.join(" ")
    );
    stderr
}

fn assert_contains(text: &str, expected: &str) {
    assert!(text.contains(expected), "expected {expected:?} in:\n{text}");
}

#[test]
fn roles_authenticate_by_password_and_nkey_and_stop_on_wrong_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler_key = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join("scheduler.nk");
    std::fs::write(&seed_file, scheduler_key.seed().unwrap()).unwrap();
    let stranger_seed_file = dir.path().join("stranger.nk");
    std::fs::write(
        &stranger_seed_file,
        nkeys::KeyPair::new_user().seed().unwrap(),
    )
    .unwrap();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{\n  users = [\n    {{user: \"tandem\", password: \"right-password\"}}\n    \
         {{nkey: \"{}\"}}\n  ]\n}}\n",
        scheduler_key.public_key()
    ))
    .unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();
    let seed_path = seed_file.display().to_string();

    // User and password as flags (gateway), as variables (decode); the nkey seed file as a variable (scheduler).
    let port = free_port();
    let _scheduler = TandemRole::spawn_with_env(
        "scheduler",
        &["scheduler", "--nats", &url],
        &[("TANDEM_NATS_NKEY_SEED_FILE".into(), seed_path.clone())],
        dir.path(),
    );
    let _decode = TandemRole::spawn_with_env(
        "decode",
        &["decode", "--nats", &url, "--worker-id", "decode-1"],
        &[
            ("TANDEM_NATS_USER".into(), "tandem".into()),
            ("TANDEM_NATS_PASSWORD".into(), "right-password".into()),
        ],
        dir.path(),
    );
    let _gateway = TandemRole::spawn(
        "gateway",
        &[
            "gateway",
            "--nats",
            &url,
            "--nats-user",
            "tandem",
            "--nats-password",
            "right-password",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ],
        dir.path(),
    );
    wait_ready(port, "/ready", "the gateway");
    let request_id = complete(port);

    // The log reader authenticates the same way.
    let replay = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["replay", "--nats", &url, "--quiet", "stats"])
        .args(["--nats-nkey-seed-file", &seed_path])
        .output()
        .expect("tandem replay runs");
    assert!(
        replay.status.success(),
        "replay stats with the nkey: {}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(!request_id.is_empty());

    let wrong_password = run_to_failure(
        &[
            "gateway",
            "--nats",
            &url,
            "--nats-user",
            "tandem",
            "--nats-password",
            "wrong",
        ],
        &[],
    );
    assert_contains(
        &wrong_password,
        &format!("nats authorization failed for user tandem at {url}"),
    );
    assert!(
        !wrong_password.contains("wrong"),
        "the password is never printed:\n{wrong_password}"
    );
    let no_credentials = run_to_failure(&["scheduler", "--nats", &url], &[]);
    assert_contains(
        &no_credentials,
        &format!("nats authorization failed for no credentials at {url}"),
    );
    let unknown_nkey = run_to_failure(
        &["scheduler", "--nats", &url],
        &[(
            "TANDEM_NATS_NKEY_SEED_FILE",
            &stranger_seed_file.display().to_string(),
        )],
    );
    assert_contains(
        &unknown_nkey,
        "nats authorization failed for the nkey seed in",
    );
    let replay_refused = run_to_failure(
        &[
            "replay",
            "--nats",
            &url,
            "--quiet",
            "stats",
            "--nats-token",
            "nope",
        ],
        &[],
    );
    assert_contains(&replay_refused, "nats authorization failed for a token");
    let half_given = run_to_failure(&["scheduler", "--nats", &url, "--nats-user", "tandem"], &[]);
    assert_contains(&half_given, "--nats-user needs --nats-password");
}

#[test]
fn roles_authenticate_by_token_and_stop_on_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with_config("authorization {\n  token: \"right-token\"\n}\n")
        .unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();
    // Every role in one process, over JetStream with the token.
    let serve = TandemServe::start(
        &dir.path().join("serve"),
        &["--nats", &url, "--nats-token", "right-token"],
    );
    complete(serve.port);
    serve.stop();

    // `tandem bench log` reaches the same server with the same flags.
    let bench = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "log", "--backend", "jetstream", "--nats", &url])
        .args(["--nats-token", "right-token", "--count", "50"])
        .output()
        .expect("tandem bench log runs");
    let bench_out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success() && bench_out.contains("jetstream"),
        "bench log with the token: {bench_out}\n{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let bench_without = run_to_failure(
        &["bench", "log", "--backend", "jetstream", "--nats", &url],
        &[],
    );
    assert_contains(
        &bench_without,
        &format!("nats authorization failed for no credentials at {url}"),
    );

    let wrong = run_to_failure(
        &["decode", "--nats", &url],
        &[("TANDEM_NATS_TOKEN", "wrong-token")],
    );
    assert_contains(
        &wrong,
        &format!("nats authorization failed for a token at {url}"),
    );
    assert!(
        !wrong.contains("wrong-token"),
        "the token is never printed:\n{wrong}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files in `dir`.
struct TlsFiles {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn generate_tls_files(dir: &Path) -> TlsFiles {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tandem test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, common_name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key_pem) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "nats-server",
    );
    let (client_pem, client_key_pem) =
        leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, "tandem");
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(&files.server_cert, server_pem).unwrap();
    std::fs::write(&files.server_key, server_key_pem).unwrap();
    std::fs::write(&files.client_cert, client_pem).unwrap();
    std::fs::write(&files.client_key, client_key_pem).unwrap();
    files
}

#[test]
fn roles_connect_over_tls_with_a_custom_ca_and_refuse_an_unknown_server() {
    let dir = tempfile::tempdir().unwrap();
    let tls = generate_tls_files(dir.path());
    // The server verifies clients too: only a certificate from the same CA gets in.
    let nats = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
        tls.server_cert.display(),
        tls.server_key.display(),
        tls.ca.display()
    ))
    .unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let serve = TandemServe::start(
        &dir.path().join("serve"),
        &[
            "--nats",
            &url,
            "--nats-tls-ca",
            &ca,
            "--nats-tls-cert",
            &cert,
            "--nats-tls-key",
            &key,
        ],
    );
    complete(serve.port);
    serve.stop();

    // Without the CA the server's certificate is not trusted.
    let untrusted = run_to_failure(&["scheduler", "--nats", &url], &[]);
    assert_contains(&untrusted, &format!("TLS to NATS at {url} failed"));
    // With the CA but no client certificate the server refuses the client.
    let no_client_cert =
        run_to_failure(&["gateway", "--nats", &url], &[("TANDEM_NATS_TLS_CA", &ca)]);
    assert_contains(&no_client_cert, &format!("TLS to NATS at {url} failed"));
    let half_given = run_to_failure(
        &[
            "scheduler",
            "--nats",
            &url,
            "--nats-tls-ca",
            &ca,
            "--nats-tls-cert",
            &cert,
        ],
        &[],
    );
    assert_contains(
        &half_given,
        "--nats-tls-cert and --nats-tls-key go together",
    );
}
