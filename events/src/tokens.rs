//! Token streaming from a decode worker to the gateway that holds the client: [`TokenUpdate`] messages on a
//! request's token subject (`tandem.tok.<request_id>`), not persisted (the durable record is `TokensDecoded`).
//!
//! Two transports behind [`TokenBus`]: NATS core (a fleet) and an in-process channel map (`tandem serve` on the
//! embedded log). The gateway subscribes before it appends `Received`, so no update can be missed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;

use crate::log::LogError;
use crate::subjects;

/// One alternative in a token's logprobs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TopLogprob {
    #[prost(uint32, tag = "1")]
    pub token_id: u32,
    /// The token's text as the tokenizer decodes it alone (may be a partial UTF-8 sequence, see `bytes`).
    #[prost(string, tag = "2")]
    pub token: String,
    #[prost(bytes = "vec", tag = "3")]
    pub bytes: Vec<u8>,
    #[prost(float, tag = "4")]
    pub logprob: f32,
}

/// The logprob of a generated token, with the top alternatives when asked for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TokenLogprob {
    #[prost(message, optional, tag = "1")]
    pub chosen: Option<TopLogprob>,
    #[prost(message, repeated, tag = "2")]
    pub top: Vec<TopLogprob>,
}

/// What a decode worker sends to the gateway: the next generated tokens, their text, and at the end why it
/// finished (or why it failed).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TokenUpdate {
    /// Index, among generated tokens, of the first token in `token_ids`. The gateway drops any token index it has
    /// already sent (after a migration, tokens are sent again from the last checkpoint).
    #[prost(uint32, tag = "1")]
    pub start_index: u32,
    #[prost(uint32, repeated, tag = "2")]
    pub token_ids: Vec<u32>,
    /// Text these tokens add, never ending inside a multi-byte character and never containing a stop string (text
    /// held back while it could still be the start of one is sent when it can no longer be).
    #[prost(string, tag = "3")]
    pub text: String,
    /// One per token in `token_ids` when logprobs were asked for.
    #[prost(message, repeated, tag = "4")]
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last update: `stop` or `length`.
    #[prost(string, optional, tag = "5")]
    pub finish_reason: Option<String>,
    /// Set on the last update when the request failed; the text says why.
    #[prost(string, optional, tag = "6")]
    pub error: Option<String>,
    #[prost(uint32, tag = "7")]
    pub prompt_tokens: u32,
    /// Decode worker that sent it.
    #[prost(string, tag = "8")]
    pub worker_id: String,
}

impl TokenUpdate {
    pub fn is_last(&self) -> bool {
        self.finish_reason.is_some() || self.error.is_some()
    }
}

/// The updates of one request, in the order they were published.
pub type TokenStream = Pin<Box<dyn Stream<Item = TokenUpdate> + Send>>;

/// Carries token updates from decode workers to gateways.
#[async_trait]
pub trait TokenBus: Send + Sync {
    /// Sends an update to whoever is subscribed to the request; nobody listening is not an error (the client
    /// went away, and the cancellation is on its way through the log).
    async fn publish(&self, request_id: &str, update: TokenUpdate) -> Result<(), LogError>;

    /// Subscribes to a request's updates. Subscribe before appending `Received`.
    async fn subscribe(&self, request_id: &str) -> Result<TokenStream, LogError>;
}

fn invalid_id(error: subjects::InvalidSubjectToken) -> LogError {
    LogError::Invalid {
        what: "request id",
        reason: error.to_string(),
    }
}

/// Token updates over NATS core.
pub struct NatsTokenBus {
    client: async_nats::Client,
}

impl NatsTokenBus {
    pub fn new(client: async_nats::Client) -> NatsTokenBus {
        NatsTokenBus { client }
    }
}

#[async_trait]
impl TokenBus for NatsTokenBus {
    async fn publish(&self, request_id: &str, update: TokenUpdate) -> Result<(), LogError> {
        let subject = subjects::token_subject(request_id).map_err(invalid_id)?;
        self.client
            .publish(subject, Bytes::from(update.encode_to_vec()))
            .await
            .map_err(|error| LogError::JetStream {
                operation: "token publish",
                reason: error.to_string(),
            })
    }

    async fn subscribe(&self, request_id: &str) -> Result<TokenStream, LogError> {
        let subject = subjects::token_subject(request_id).map_err(invalid_id)?;
        let subscriber = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|error| LogError::JetStream {
                operation: "token subscribe",
                reason: error.to_string(),
            })?;
        // Make sure the server has the subscription before the caller appends `Received`.
        self.client
            .flush()
            .await
            .map_err(|error| LogError::JetStream {
                operation: "token subscribe",
                reason: error.to_string(),
            })?;
        Ok(Box::pin(subscriber.filter_map(move |message| {
            let decoded = TokenUpdate::decode(message.payload.as_ref());
            if let Err(error) = &decoded {
                tracing::warn!(%subject, %error, "malformed token update dropped");
            }
            futures::future::ready(decoded.ok())
        })))
    }
}

/// Token updates between tasks of one process.
#[derive(Default, Clone)]
pub struct InProcessTokenBus {
    subscribers: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<TokenUpdate>>>>,
}

impl InProcessTokenBus {
    pub fn new() -> InProcessTokenBus {
        InProcessTokenBus::default()
    }
}

#[async_trait]
impl TokenBus for InProcessTokenBus {
    async fn publish(&self, request_id: &str, update: TokenUpdate) -> Result<(), LogError> {
        let mut subscribers = self.subscribers.lock().map_err(|_| LogError::Closed)?;
        let last = update.is_last();
        if let Some(sender) = subscribers.get(request_id)
            && (sender.send(update).is_err() || last)
        {
            subscribers.remove(request_id);
        }
        Ok(())
    }

    async fn subscribe(&self, request_id: &str) -> Result<TokenStream, LogError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut subscribers = self.subscribers.lock().map_err(|_| LogError::Closed)?;
        // Forget requests whose subscriber went away (a cancelled request may never be published to again).
        subscribers.retain(|_, sender| !sender.is_closed());
        subscribers.insert(request_id.to_string(), sender);
        Ok(Box::pin(tokio_stream_from(receiver)))
    }
}

fn tokio_stream_from(
    mut receiver: mpsc::UnboundedReceiver<TokenUpdate>,
) -> impl Stream<Item = TokenUpdate> + Send {
    futures::stream::poll_fn(move |context| receiver.poll_recv(context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_bus_delivers_in_order_and_forgets_finished_requests() {
        let bus = InProcessTokenBus::new();
        let mut stream = bus.subscribe("req1").await.unwrap();
        for index in 0..3 {
            bus.publish(
                "req1",
                TokenUpdate {
                    start_index: index,
                    token_ids: vec![index],
                    finish_reason: (index == 2).then(|| "length".to_string()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        // Nobody listening: not an error.
        bus.publish("other", TokenUpdate::default()).await.unwrap();
        let received: Vec<u32> = (&mut stream)
            .take(3)
            .map(|update| update.start_index)
            .collect()
            .await;
        assert_eq!(received, vec![0, 1, 2]);
        assert!(bus.subscribers.lock().unwrap().is_empty());
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the last update"
        );
    }
}
