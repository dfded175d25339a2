//! API keys: who may call the gateway. Keys are held only as SHA-256 digests, a presented key is compared with
//! every digest in constant time, and a request is let through, or refused with OpenAI's 401, before any handler
//! runs. The paths that stay open (probes, the OpenAPI document, `/metrics` unless configured otherwise) are one
//! list the check consults.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::errors::ApiError;

/// Paths anyone may call: probes must work without a key (Kubernetes sends none), and the API's own description
/// holds nothing secret.
const ALWAYS_OPEN_PATHS: &[&str] = &["/health", "/ready", "/openapi.json"];
/// The Prometheus scrape path: open unless [`AuthConfig::metrics_require_key`].
const METRICS_PATH: &str = "/metrics";

/// The configured API keys, as SHA-256 digests only: the plaintext is dropped as soon as it is hashed, and a
/// digest compared in constant time leaks neither the key nor its length through timing.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// Hashes each key; empty strings (a trailing comma in `TANDEM_API_KEYS`) are skipped.
    pub fn from_plaintext<I, S>(keys: I) -> ApiKeys
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut digests: Vec<[u8; 32]> = Vec::new();
        for key in keys {
            let key = key.as_ref().trim();
            if key.is_empty() {
                continue;
            }
            let digest = digest_of(key);
            if !digests.contains(&digest) {
                digests.push(digest);
            }
        }
        ApiKeys { digests }
    }

    /// No keys: the API is open.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Which key `presented` is, compared with every digest (no early exit, so the time does not tell which key
    /// matched or how close a guess came).
    fn identify(&self, presented: &str) -> Option<KeyId> {
        let presented = digest_of(presented);
        let mut found: Option<KeyId> = None;
        for (index, digest) in self.digests.iter().enumerate() {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(KeyId(index));
            }
        }
        found
    }
}

impl std::fmt::Debug for ApiKeys {
    /// Never the digests: a log line with them would let an offline guesser test keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} configured)", self.digests.len())
    }
}

fn digest_of(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Which configured key a request carried (its index); per-key limits are counted by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub usize);

/// The client a request is counted against: a key, or everyone when the API is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Key(KeyId),
    Anonymous,
}

/// Who may call what.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub api_keys: ApiKeys,
    /// `/metrics` needs a key too (when keys are configured).
    pub metrics_require_key: bool,
}

impl AuthConfig {
    /// Whether `path` is served without a key.
    pub fn is_open(&self, path: &str) -> bool {
        ALWAYS_OPEN_PATHS.contains(&path) || (path == METRICS_PATH && !self.metrics_require_key)
    }

    /// The client of a request to `path` with this `Authorization` header, or the 401 to answer.
    pub fn authorize(
        &self,
        path: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<Client, ApiError> {
        if self.api_keys.is_empty() || self.is_open(path) {
            return Ok(Client::Anonymous);
        }
        let Some(authorization) = authorization else {
            return Err(missing_key());
        };
        let token = authorization
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or_else(malformed_authorization)?;
        self.api_keys
            .identify(token)
            .map(Client::Key)
            .ok_or_else(wrong_key)
    }
}

/// OpenAI's answer to a request without a key (its `code` is null there too).
fn missing_key() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
        error_type: "invalid_request_error",
        param: None,
        code: None,
    }
}

fn malformed_authorization() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "The Authorization header must be `Bearer YOUR_KEY`.".into(),
        error_type: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
}

/// Never echoes the presented key (OpenAI shows a masked prefix; a log of refusals is better without any of it).
fn wrong_key() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "Incorrect API key provided.".into(),
        error_type: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
}

/// The middleware: lets a request through with its [`Client`] in the extensions, or answers 401 with
/// `WWW-Authenticate: Bearer`.
pub(crate) async fn require_api_key(
    State(auth): State<Arc<AuthConfig>>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = auth.authorize(
        request.uri().path(),
        request.headers().get(header::AUTHORIZATION),
    );
    match client {
        Ok(client) => {
            request.extensions_mut().insert(client);
            next.run(request).await
        }
        Err(error) => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(keys: &[&str], metrics_require_key: bool) -> AuthConfig {
        AuthConfig {
            api_keys: ApiKeys::from_plaintext(keys),
            metrics_require_key,
        }
    }

    fn bearer(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn keys_are_identified_by_their_digest_and_order() {
        let auth = auth(&["alpha", "", "beta", "alpha"], false);
        assert_eq!(auth.api_keys.len(), 2);
        let path = "/v1/chat/completions";
        assert_eq!(
            auth.authorize(path, Some(&bearer("Bearer beta"))),
            Ok(Client::Key(KeyId(1)))
        );
        assert_eq!(
            auth.authorize(path, Some(&bearer("bearer  alpha "))),
            Ok(Client::Key(KeyId(0)))
        );
        let wrong = auth
            .authorize(path, Some(&bearer("Bearer gamma")))
            .unwrap_err();
        assert_eq!(wrong.code, Some("invalid_api_key"));
        let missing = auth.authorize(path, None).unwrap_err();
        assert_eq!(
            (missing.status, missing.code),
            (StatusCode::UNAUTHORIZED, None)
        );
        let basic = auth
            .authorize(path, Some(&bearer("Basic YWxwaGE=")))
            .unwrap_err();
        assert_eq!(basic.code, Some("invalid_api_key"));
        assert!(format!("{:?}", auth.api_keys).contains("2 configured"));
    }

    #[test]
    fn open_paths_and_metrics_flag() {
        let open_metrics = auth(&["k"], false);
        for path in ["/health", "/ready", "/openapi.json", "/metrics"] {
            assert_eq!(
                open_metrics.authorize(path, None),
                Ok(Client::Anonymous),
                "{path}"
            );
        }
        assert!(open_metrics.authorize("/v1/models", None).is_err());
        let keyed_metrics = auth(&["k"], true);
        assert!(keyed_metrics.authorize("/metrics", None).is_err());
        assert!(keyed_metrics.authorize("/health", None).is_ok());
        // Without keys everything is open, whatever the flag says.
        assert_eq!(
            auth(&[], true).authorize("/v1/models", None),
            Ok(Client::Anonymous)
        );
    }
}
