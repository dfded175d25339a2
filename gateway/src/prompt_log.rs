//! How much of a prompt goes on the log (`--log-prompts full|hash|none`), and, when not all of it, the prompt's
//! short-lived entry in the prompt store (`tandem_events::prompts`): written before `Received`, deleted when the
//! request ends here.

use std::str::FromStr;
use std::sync::Arc;

use tandem_events::log::{EventLog, KvBucket, LogError};
use tandem_events::prompts::{PROMPT_BUCKET, PROMPT_TTL, encode_prompt};
use tokio::sync::OnceCell;

use crate::errors::ApiError;

/// What `Received` carries of the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptLogging {
    /// The token ids (what `replay rerun` and migration after the request's end need), their hash and length.
    #[default]
    Full,
    /// The SHA-256 of the ids and their number; the ids go to the prompt store only while the request runs.
    Hash,
    /// The number of ids only.
    None,
}

impl PromptLogging {
    pub fn as_str(self) -> &'static str {
        match self {
            PromptLogging::Full => "full",
            PromptLogging::Hash => "hash",
            PromptLogging::None => "none",
        }
    }
}

impl FromStr for PromptLogging {
    type Err = String;

    fn from_str(text: &str) -> Result<PromptLogging, String> {
        match text {
            "full" => Ok(PromptLogging::Full),
            "hash" => Ok(PromptLogging::Hash),
            "none" => Ok(PromptLogging::None),
            other => Err(format!("{other:?} is not full, hash or none")),
        }
    }
}

impl std::fmt::Display for PromptLogging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The prompt store's bucket, opened on the first redacted request.
pub(crate) struct PromptStore {
    log: Arc<dyn EventLog>,
    bucket: OnceCell<Box<dyn KvBucket>>,
}

impl PromptStore {
    pub fn new(log: Arc<dyn EventLog>) -> PromptStore {
        PromptStore {
            log,
            bucket: OnceCell::new(),
        }
    }

    async fn bucket(&self) -> Result<&dyn KvBucket, LogError> {
        let bucket = self
            .bucket
            .get_or_try_init(|| self.log.kv_bucket(PROMPT_BUCKET, PROMPT_TTL))
            .await?;
        Ok(bucket.as_ref())
    }

    /// Stores the prompt of `request_id`; the returned guard deletes it when dropped (the request ended here).
    pub async fn put(
        self: &Arc<PromptStore>,
        request_id: &str,
        prompt_token_ids: &[u32],
    ) -> Result<PromptRelease, ApiError> {
        let unavailable = |error: LogError| {
            ApiError::unavailable(format!(
                "The prompt store is unavailable, the request was not accepted: {error}"
            ))
        };
        self.bucket()
            .await
            .map_err(unavailable)?
            .put(request_id, encode_prompt(prompt_token_ids))
            .await
            .map_err(unavailable)?;
        Ok(PromptRelease {
            store: Arc::clone(self),
            request_id: request_id.to_string(),
        })
    }
}

/// Deletes a request's stored prompt when dropped: once the gateway lets go of a request, no worker needs it.
pub(crate) struct PromptRelease {
    store: Arc<PromptStore>,
    request_id: String,
}

impl Drop for PromptRelease {
    fn drop(&mut self) {
        let store = Arc::clone(&self.store);
        let request_id = std::mem::take(&mut self.request_id);
        // Outside a runtime (a test dropping late) the bucket's time-to-live removes the entry instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let deleted = match store.bucket().await {
                    Ok(bucket) => bucket.delete(&request_id).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = deleted {
                    tracing::warn!(%request_id, %error, "could not delete a stored prompt; it expires with the bucket's time-to-live");
                }
            });
        }
    }
}
