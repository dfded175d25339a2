//! How a role proves who it is to nats-server and checks who the server is: [`NatsConnectOptions`] (one
//! authentication method, TLS with a custom CA and an optional client certificate) and the one place every NATS
//! connection of tandem is opened, which turns a refusal into an error that names the method and the URL.
//!
//! A refused identity or a failed TLS handshake is an error at once, never a retry: a role started with wrong
//! credentials must stop with a message its operator can act on, not wait for a server that will never let it in.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ConnectErrorKind;

use super::LogError;

/// How a client authenticates: at most one method, as nats-server accepts one per connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (or the ones in the URL, `nats://user:password@host`).
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A file holding an nkey seed (`SU…`): the server knows the public key and checks a signed nonce.
    NkeySeedFile(PathBuf),
    /// A `.creds` file (user JWT + nkey seed) for servers in operator/JWT mode.
    CredentialsFile(PathBuf),
}

/// TLS to nats-server. A `tls://` URL, a server that demands TLS, or any field here turns it on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM file of the CA(s) that signed the server's certificate, trusted in place of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients (`verify: true`).
    pub client_cert_and_key: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    fn is_configured(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_and_key.is_some()
    }
}

/// Everything about a NATS connection beyond its URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsConnectOptions {
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

impl NatsConnectOptions {
    /// Who this connection says it is, for error messages (never a secret).
    pub fn identity(&self) -> String {
        match &self.auth {
            NatsAuth::None => "no credentials".to_string(),
            NatsAuth::UserPassword { user, .. } => format!("user {user}"),
            NatsAuth::Token(_) => "a token".to_string(),
            NatsAuth::NkeySeedFile(path) => format!("the nkey seed in {}", path.display()),
            NatsAuth::CredentialsFile(path) => format!("the credentials file {}", path.display()),
        }
    }

    /// Opens a connection named `tandem`, failing at once on a refused identity or a failed TLS handshake.
    pub async fn connect(&self, url: &str) -> Result<async_nats::Client, LogError> {
        let mut options = async_nats::ConnectOptions::new();
        match &self.auth {
            NatsAuth::None => {}
            NatsAuth::UserPassword { user, password } => {
                options = options.user_and_password(user.clone(), password.clone());
            }
            NatsAuth::Token(token) => options = options.token(token.clone()),
            NatsAuth::NkeySeedFile(path) => options = options.nkey(read_nkey_seed(path)?),
            NatsAuth::CredentialsFile(path) => {
                options = options.credentials_file(path).await.map_err(|error| {
                    LogError::Invalid {
                        what: "NATS credentials file",
                        reason: format!(
                            "{}: {error} (expected a .creds file as `nsc generate creds` writes it)",
                            path.display()
                        ),
                    }
                })?;
            }
        }
        if let Some(ca_file) = &self.tls.ca_file {
            check_readable(ca_file, "NATS TLS CA file")?;
            options = options.add_root_certificates(ca_file.clone());
        }
        if let Some((cert, key)) = &self.tls.client_cert_and_key {
            check_readable(cert, "NATS TLS client certificate")?;
            check_readable(key, "NATS TLS client key")?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls.is_configured() {
            // Given a CA or a client certificate, never fall back to plain text with a server that offers no TLS.
            options = options.require_tls(true);
        }
        options
            .name("tandem")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|error| self.connect_error(url, error))
    }

    fn connect_error(&self, url: &str, error: async_nats::ConnectError) -> LogError {
        let reason = error.to_string();
        match error.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                let identity = match self.auth {
                    // `nats://user:password@host` carries its own credentials.
                    NatsAuth::None if url.contains('@') => "the credentials in the URL".to_string(),
                    _ => self.identity(),
                };
                LogError::Authorization {
                    url: redact_url(url),
                    identity,
                    reason,
                }
            }
            ConnectErrorKind::Tls => LogError::Tls {
                url: redact_url(url),
                reason,
            },
            // A refused handshake (an untrusted server certificate, a missing client certificate) arrives as an
            // I/O error carrying the rustls error.
            ConnectErrorKind::Io if carries_rustls_error(&error) => LogError::Tls {
                url: redact_url(url),
                reason,
            },
            _ => LogError::Connect {
                url: redact_url(url),
                reason,
            },
        }
    }
}

/// The URL without its user info, so a password in it never reaches a log line.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn carries_rustls_error(error: &async_nats::ConnectError) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if current.is::<async_nats::rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps: look at that one itself.
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && inner.is::<async_nats::rustls::Error>()
        {
            return true;
        }
        cause = current.source();
    }
    false
}

fn check_readable(path: &std::path::Path, what: &'static str) -> Result<(), LogError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|error| LogError::Invalid {
            what,
            reason: format!("{}: {error}", path.display()),
        })
}

/// The seed from a seed file: the first line that looks like a seed (`nk -gen user` writes just the seed; a
/// `.nk` file may carry comments).
fn read_nkey_seed(path: &std::path::Path) -> Result<String, LogError> {
    let text = std::fs::read_to_string(path).map_err(|error| LogError::Invalid {
        what: "NATS nkey seed file",
        reason: format!("{}: {error}", path.display()),
    })?;
    text.lines()
        .map(str::trim)
        .find(|line| line.starts_with('S') && line.len() > 50 && !line.contains(' '))
        .map(str::to_string)
        .ok_or_else(|| LogError::Invalid {
            what: "NATS nkey seed file",
            reason: format!(
                "{} holds no nkey seed (a line `SU…`, as `nk -gen user` prints it)",
                path.display()
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_names_the_method_and_never_the_secret() {
        let by_password = NatsConnectOptions {
            auth: NatsAuth::UserPassword {
                user: "tandem".into(),
                password: "s3cret".into(),
            },
            ..Default::default()
        };
        assert_eq!(by_password.identity(), "user tandem");
        let by_token = NatsConnectOptions {
            auth: NatsAuth::Token("t0ken".into()),
            ..Default::default()
        };
        assert!(!by_token.identity().contains("t0ken"));
    }

    #[tokio::test]
    async fn missing_credential_and_certificate_files_are_named_before_any_connection() {
        // Port 1 on loopback: nothing listens, so an error naming the file proves no connection was tried first.
        let url = "nats://127.0.0.1:1";
        let creds = NatsConnectOptions {
            auth: NatsAuth::CredentialsFile("/nonexistent/tandem.creds".into()),
            ..Default::default()
        };
        let error = creds.connect(url).await.unwrap_err().to_string();
        assert!(error.contains("/nonexistent/tandem.creds"), "{error}");
        let ca = NatsConnectOptions {
            tls: NatsTls {
                ca_file: Some("/nonexistent/ca.pem".into()),
                client_cert_and_key: None,
            },
            ..Default::default()
        };
        let error = ca.connect(url).await.unwrap_err().to_string();
        assert!(
            error.contains("NATS TLS CA file") && error.contains("/nonexistent/ca.pem"),
            "{error}"
        );
    }

    #[test]
    fn a_password_in_the_url_is_redacted() {
        assert_eq!(
            redact_url("nats://tandem:s3cret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(redact_url("nats://nats:4222"), "nats://nats:4222");
    }

    #[test]
    fn a_seed_file_without_a_seed_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.nk");
        std::fs::write(&path, "not a seed\n").unwrap();
        let error = read_nkey_seed(&path).unwrap_err().to_string();
        assert!(error.contains("holds no nkey seed"), "{error}");
        let missing = read_nkey_seed(&dir.path().join("missing.nk"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing.nk"), "{missing}");
    }
}
