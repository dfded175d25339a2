//! `--nats-*` flags: how every role (and `tandem replay`) authenticates to nats-server and checks its TLS
//! certificate. Each flag has a `TANDEM_NATS_*` variable; secrets are best given through the environment or files
//! (a Kubernetes Secret), since flags show in the process list.

use std::path::PathBuf;

use anyhow::{Result, bail};
use tandem_events::log::nats_connection::{NatsAuth, NatsConnectOptions, NatsTls};

/// NATS credentials and TLS. At most one of user/password, token, nkey seed file and creds file.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NatsArgs {
    /// NATS user name (with --nats-password).
    #[arg(long, env = "TANDEM_NATS_USER", global = true)]
    nats_user: Option<String>,
    /// NATS password of --nats-user.
    #[arg(
        long,
        env = "TANDEM_NATS_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "TANDEM_NATS_TOKEN", hide_env_values = true, global = true)]
    nats_token: Option<String>,
    /// File holding an nkey seed (`SU…`, from `nk -gen user`); the server lists its public key.
    #[arg(long, env = "TANDEM_NATS_NKEY_SEED_FILE", global = true)]
    nats_nkey_seed_file: Option<PathBuf>,
    /// NATS credentials file (user JWT and seed, from `nsc generate creds`), for servers in operator mode.
    #[arg(long, env = "TANDEM_NATS_CREDS", global = true)]
    nats_creds: Option<PathBuf>,
    /// PEM file of the CA that signed nats-server's certificate; TLS is then required.
    #[arg(long, env = "TANDEM_NATS_TLS_CA", global = true)]
    nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that verifies clients (with --nats-tls-key).
    #[arg(long, env = "TANDEM_NATS_TLS_CERT", global = true)]
    nats_tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "TANDEM_NATS_TLS_KEY", global = true)]
    nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    /// The connection options these flags ask for; contradictory or half-given flags are an error.
    pub fn connect_options(&self) -> Result<NatsConnectOptions> {
        let mut methods = Vec::new();
        if let Some(user) = &self.nats_user {
            let Some(password) = &self.nats_password else {
                bail!("--nats-user needs --nats-password (or TANDEM_NATS_PASSWORD)");
            };
            methods.push(NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            });
        } else if self.nats_password.is_some() {
            bail!("--nats-password needs --nats-user (or TANDEM_NATS_USER)");
        }
        if let Some(token) = &self.nats_token {
            methods.push(NatsAuth::Token(token.clone()));
        }
        if let Some(path) = &self.nats_nkey_seed_file {
            methods.push(NatsAuth::NkeySeedFile(path.clone()));
        }
        if let Some(path) = &self.nats_creds {
            methods.push(NatsAuth::CredentialsFile(path.clone()));
        }
        if methods.len() > 1 {
            bail!(
                "give one NATS authentication method: user/password, --nats-token, --nats-nkey-seed-file or \
                 --nats-creds (check the TANDEM_NATS_* variables too)"
            );
        }
        let client_cert_and_key = match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => bail!("--nats-tls-cert and --nats-tls-key go together"),
        };
        Ok(NatsConnectOptions {
            auth: methods.pop().unwrap_or_default(),
            tls: NatsTls {
                ca_file: self.nats_tls_ca.clone(),
                client_cert_and_key,
            },
        })
    }
}
