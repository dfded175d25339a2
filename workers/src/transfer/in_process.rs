//! [`InProcessTransport`]: KV transfers between roles of one process (`tandem serve`). Receivers register
//! under a name in the transport's registry (`inproc://NAME`); a transfer is a channel of layer chunks
//! moved as [`Bytes`] (no copy of the KV), through the same checks as over TCP: the header is admitted by
//! the shared receiver core, each layer's length and crc32 verified, every wait bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::receiver::{KvReceiver, ReceiverCore, Session};
use super::wire::{Reply, TransferHeader};
use super::{
    KvTransport, OutgoingTransfer, TransferError, TransferReport, TransferTimeouts, TransportKind,
    refused, split_endpoint,
};

/// Layers in flight per transfer: enough to overlap producing one with verifying another, few enough that
/// a slow receiver holds the producer back instead of buffering a whole prompt twice.
const FRAMES_IN_FLIGHT: usize = 4;
const PENDING_CONNECTIONS: usize = 64;

type Registry = Arc<Mutex<HashMap<String, mpsc::Sender<Connection>>>>;
type Verdict = oneshot::Sender<Result<(), Reply>>;

enum Frame {
    Layer { bytes: Bytes, crc32: u32 },
    End { first_token_id: Option<u32> },
}

struct Connection {
    header: TransferHeader,
    accepted: Verdict,
    frames: mpsc::Receiver<Frame>,
    done: Verdict,
}

/// KV transfers within one process. Clones share one registry: give the decode and prefill roles of a
/// process clones of the same transport.
#[derive(Clone, Default)]
pub struct InProcessTransport {
    registry: Registry,
    timeouts: TransferTimeouts,
}

impl InProcessTransport {
    pub fn new(timeouts: TransferTimeouts) -> Self {
        Self {
            registry: Registry::default(),
            timeouts,
        }
    }
}

fn lock(registry: &Registry) -> MutexGuard<'_, HashMap<String, mpsc::Sender<Connection>>> {
    // Every update is one insert or remove: a poisoned lock still holds a consistent map.
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes a receiver's name when its accept task ends (the receiver was dropped).
struct Registration {
    registry: Registry,
    name: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry).remove(&self.name);
    }
}

impl KvTransport for InProcessTransport {
    type Outgoing = InProcessOutgoing;

    fn kind(&self) -> TransportKind {
        TransportKind::InProcess
    }

    async fn listen(&self, name: &str) -> Result<KvReceiver, TransferError> {
        let endpoint = format!("inproc://{name}");
        let (connections, mut incoming) = mpsc::channel(PENDING_CONNECTIONS);
        {
            let mut registry = lock(&self.registry);
            if name.is_empty() || registry.contains_key(name) {
                return Err(TransferError::BadEndpoint {
                    endpoint,
                    detail: "empty or already bound in this process".into(),
                });
            }
            registry.insert(name.to_owned(), connections);
        }
        let registration = Registration {
            registry: Arc::clone(&self.registry),
            name: name.to_owned(),
        };
        let core = ReceiverCore::new(endpoint, 0);
        let task_core = Arc::clone(&core);
        let io_timeout = self.timeouts.io;
        let task = tokio::spawn(async move {
            let _registration = registration;
            while let Some(connection) = incoming.recv().await {
                tokio::spawn(serve_connection(
                    Arc::clone(&task_core),
                    connection,
                    io_timeout,
                ));
            }
        });
        Ok(KvReceiver::new(core, task))
    }

    async fn connect(
        &self,
        endpoint: &str,
        header: TransferHeader,
    ) -> Result<InProcessOutgoing, TransferError> {
        let started = Instant::now();
        header
            .validate()
            .map_err(|detail| TransferError::Malformed {
                context: format!("header of transfer {}", header.request_id),
                detail,
            })?;
        let name = split_endpoint(endpoint, "inproc")?;
        let Some(connections) = lock(&self.registry).get(name).cloned() else {
            return Err(TransferError::BadEndpoint {
                endpoint: endpoint.to_owned(),
                detail: "no receiver of that name in this process".into(),
            });
        };
        let request_id = header.request_id.clone();
        let (frames, frames_rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let (accepted, accepted_rx) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        let connection = Connection {
            header: header.clone(),
            accepted,
            frames: frames_rx,
            done,
        };
        let deadline = started + self.timeouts.handshake;
        let waiting = "for the receiver to accept the header";
        let closed = || TransferError::ReceiverClosed {
            request_id: request_id.clone(),
            endpoint: endpoint.to_owned(),
            detail: "the receiver went away".into(),
        };
        let limit = remaining(deadline);
        match tokio::time::timeout(limit, connections.send(connection)).await {
            Err(_) => return Err(TransferError::timeout(&request_id, waiting, limit)),
            Ok(Err(_)) => return Err(closed()),
            Ok(Ok(())) => {}
        }
        let limit = remaining(deadline);
        match tokio::time::timeout(limit, accepted_rx).await {
            Err(_) => return Err(TransferError::timeout(&request_id, waiting, limit)),
            Ok(Err(_)) => return Err(closed()),
            Ok(Ok(Err(refusal))) => return Err(refused(endpoint, &request_id, refusal)),
            Ok(Ok(Ok(()))) => {}
        }
        Ok(InProcessOutgoing {
            endpoint: endpoint.to_owned(),
            header,
            frames,
            done: done_rx,
            timeouts: self.timeouts,
            started,
            next_layer: 0,
        })
    }
}

async fn serve_connection(core: Arc<ReceiverCore>, connection: Connection, io_timeout: Duration) {
    let Connection {
        header,
        accepted,
        mut frames,
        done,
    } = connection;
    let mut session = match core.admit(header, TransportKind::InProcess) {
        Ok(session) => session,
        Err(error) => {
            let _ = accepted.send(Err(Reply::refusal(&error)));
            return;
        }
    };
    if accepted.send(Ok(())).is_err() {
        let request_id = session.header().request_id.clone();
        session.fail(TransferError::timeout(
            &request_id,
            "for the sender (it gave up before the header was accepted)",
            Duration::ZERO,
        ));
        return;
    }
    let verdict = receive(&mut frames, &mut session, io_timeout).await;
    let reply = match verdict {
        Ok(first_token_id) => session
            .finish(first_token_id)
            .map_err(|e| Reply::refusal(&e)),
        Err(error) => Err(Reply::refusal(&session.fail(error))),
    };
    let _ = done.send(reply);
}

async fn receive(
    frames: &mut mpsc::Receiver<Frame>,
    session: &mut Session,
    io_timeout: Duration,
) -> Result<Option<u32>, TransferError> {
    let request_id = session.header().request_id.clone();
    loop {
        let limit = io_timeout.min(remaining(session.deadline()));
        let waiting_for = format!("for layer {}", session.next_layer());
        match tokio::time::timeout(limit, frames.recv()).await {
            Err(_) => return Err(TransferError::timeout(&request_id, waiting_for, limit)),
            Ok(None) => {
                return Err(TransferError::Malformed {
                    context: format!("transfer {request_id}"),
                    detail: format!("the sender went away after {} layers", session.next_layer()),
                });
            }
            Ok(Some(Frame::Layer { bytes, crc32 })) => {
                let layer = session.next_layer();
                session.accept_layer(layer, bytes, crc32)?;
            }
            Ok(Some(Frame::End { first_token_id })) => return Ok(first_token_id),
        }
    }
}

/// The sending side of one in-process transfer, accepted by the receiver.
pub struct InProcessOutgoing {
    endpoint: String,
    header: TransferHeader,
    frames: mpsc::Sender<Frame>,
    done: oneshot::Receiver<Result<(), Reply>>,
    timeouts: TransferTimeouts,
    started: Instant,
    next_layer: u32,
}

impl InProcessOutgoing {
    /// The receiver stopped taking frames: its verdict says why.
    async fn verdict(&mut self, limit: Duration, waiting_for: &str) -> Result<(), TransferError> {
        let request_id = self.header.request_id.clone();
        match tokio::time::timeout(limit, &mut self.done).await {
            Err(_) => Err(TransferError::timeout(&request_id, waiting_for, limit)),
            Ok(Err(_)) => Err(TransferError::ReceiverClosed {
                request_id,
                endpoint: self.endpoint.clone(),
                detail: "the receiver went away without a verdict".into(),
            }),
            Ok(Ok(Err(refusal))) => Err(refused(&self.endpoint, &request_id, refusal)),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    async fn send_frame(&mut self, frame: Frame) -> Result<(), TransferError> {
        let io = self.timeouts.io;
        match tokio::time::timeout(io, self.frames.send(frame)).await {
            Err(_) => Err(TransferError::timeout(
                &self.header.request_id,
                "for the receiver to take a layer",
                io,
            )),
            Ok(Err(_)) => {
                // The receiver ended the transfer early; it is a refusal unless something is very wrong.
                match self.verdict(io, "for the receiver's verdict").await {
                    Ok(()) => Err(TransferError::Malformed {
                        context: format!("transfer {}", self.header.request_id),
                        detail: "the receiver confirmed before the end frame".into(),
                    }),
                    Err(error) => Err(error),
                }
            }
            Ok(Ok(())) => Ok(()),
        }
    }
}

impl OutgoingTransfer for InProcessOutgoing {
    fn header(&self) -> &TransferHeader {
        &self.header
    }

    async fn send_layer_with_crc32(
        &mut self,
        bytes: Bytes,
        crc32: u32,
    ) -> Result<(), TransferError> {
        let num_layers = self.header.layout.num_layers as u32;
        let expected = self.header.layer_chunk_bytes();
        if self.next_layer >= num_layers || bytes.len() != expected {
            return Err(TransferError::Malformed {
                context: format!("sending transfer {}", self.header.request_id),
                detail: format!(
                    "layer {} of {num_layers}: {} bytes given, {expected} expected",
                    self.next_layer,
                    bytes.len()
                ),
            });
        }
        self.send_frame(Frame::Layer { bytes, crc32 }).await?;
        self.next_layer += 1;
        Ok(())
    }

    async fn finish(
        mut self,
        first_token_id: Option<u32>,
    ) -> Result<TransferReport, TransferError> {
        let num_layers = self.header.layout.num_layers as u32;
        if self.next_layer != num_layers {
            return Err(TransferError::Malformed {
                context: format!("sending transfer {}", self.header.request_id),
                detail: format!("finished after {} of {num_layers} layers", self.next_layer),
            });
        }
        self.send_frame(Frame::End { first_token_id }).await?;
        self.verdict(
            self.timeouts.ack,
            "for the receiver to confirm the transfer",
        )
        .await?;
        Ok(TransferReport {
            request_id: self.header.request_id.clone(),
            bytes: self.header.kv_bytes(),
            blocks: self.header.block_ids.len() as u32,
            layers: num_layers,
            duration_ns: self.started.elapsed().as_nanos() as u64,
            transport: TransportKind::InProcess,
        })
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
