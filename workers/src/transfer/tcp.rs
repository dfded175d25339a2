//! [`TcpTransport`]: KV transfers between hosts over one TCP connection per transfer, in the wire format of
//! [`super::wire`]. The sender writes the header, waits for the receiver to accept it, then streams each
//! layer as it is produced (large writes straight from the caller's buffer, `TCP_NODELAY` so the small
//! frames and replies are not held back) and waits for the final confirmation. Every read and write has a
//! timeout; a receiver that refuses mid-stream answers at once and drains the connection, so the sender
//! reads the reason instead of a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use super::receiver::{KvReceiver, ReceiverCore, Session};
use super::wire::{
    self, END_FRAME_LAYER, END_FRAME_PAYLOAD_BYTES, FRAME_PREFIX_BYTES, HEADER_PREFIX_BYTES,
    REPLY_PREFIX_BYTES, Reply, TransferHeader,
};
use super::{
    KvTransport, OutgoingTransfer, TransferError, TransferReport, TransferTimeouts, TransportKind,
    refused, split_endpoint,
};

/// Large enough that a layer chunk goes out in few syscalls, small enough to be nothing per connection.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Payload written (and hashed) this much at a time: fits in L2, so the hash leaves it cache-hot.
const HASHED_PIECE_BYTES: usize = 256 << 10;
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Receive memory a listener keeps for reuse unless told otherwise: a few long prompts' worth.
const DEFAULT_RECEIVE_POOL_BYTES: usize = 256 << 20;
/// How long a receiver that refused keeps reading (and discarding) so its refusal is read, not reset.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// KV transfers over TCP; endpoints are `tcp://host:port`.
#[derive(Clone, Debug)]
pub struct TcpTransport {
    timeouts: TransferTimeouts,
    receive_pool_bytes: usize,
}

impl Default for TcpTransport {
    fn default() -> Self {
        Self::new(TransferTimeouts::default())
    }
}

impl TcpTransport {
    pub fn new(timeouts: TransferTimeouts) -> Self {
        Self {
            timeouts,
            receive_pool_bytes: DEFAULT_RECEIVE_POOL_BYTES,
        }
    }

    /// How much receive memory each listener keeps for reuse ([`KvReceiver::recycle`]); size it to the
    /// KV a decode worker receives at once. Transfers beyond it read into fresh memory, about half as fast.
    pub fn with_receive_pool_bytes(mut self, receive_pool_bytes: usize) -> Self {
        self.receive_pool_bytes = receive_pool_bytes;
        self
    }
}

impl KvTransport for TcpTransport {
    type Outgoing = TcpOutgoing;

    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    async fn listen(&self, address: &str) -> Result<KvReceiver, TransferError> {
        let listener =
            TcpListener::bind(address)
                .await
                .map_err(|source| TransferError::BadEndpoint {
                    endpoint: address.to_owned(),
                    detail: format!("cannot listen: {source}"),
                })?;
        let local: SocketAddr =
            listener
                .local_addr()
                .map_err(|source| TransferError::BadEndpoint {
                    endpoint: address.to_owned(),
                    detail: format!("no local address: {source}"),
                })?;
        let core = ReceiverCore::new(format!("tcp://{local}"), self.receive_pool_bytes);
        let timeouts = self.timeouts;
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&core), timeouts));
        tracing::info!(endpoint = %core.endpoint(), "KV transfer receiver listening");
        Ok(KvReceiver::new(core, task))
    }

    async fn connect(
        &self,
        endpoint: &str,
        header: TransferHeader,
    ) -> Result<TcpOutgoing, TransferError> {
        TcpOutgoing::connect(endpoint, header, self.timeouts).await
    }
}

async fn accept_loop(listener: TcpListener, core: Arc<ReceiverCore>, timeouts: TransferTimeouts) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let core = Arc::clone(&core);
                tokio::spawn(async move {
                    serve_connection(core, stream, timeouts).await;
                    tracing::debug!(%peer, "KV transfer connection closed");
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning, keep serving.
                tracing::warn!(%error, "accepting a KV transfer connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One transfer on the receiving side: header, reply, layers, end, final reply.
async fn serve_connection(core: Arc<ReceiverCore>, stream: TcpStream, timeouts: TransferTimeouts) {
    let _ = stream.set_nodelay(true);
    let (read_half, mut writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    let header = match read_header(&mut reader, timeouts.handshake).await {
        Ok(header) => header,
        Err(error) => {
            tracing::warn!(%error, "refused a KV transfer header");
            refuse_and_drain(&mut reader, &mut writer, &error, timeouts.io).await;
            return;
        }
    };
    let mut session = match core.admit(header, TransportKind::Tcp) {
        Ok(session) => session,
        Err(error) => {
            refuse_and_drain(&mut reader, &mut writer, &error, timeouts.io).await;
            return;
        }
    };
    let request_id = session.header().request_id.clone();
    if let Err(error) = write_reply(&mut writer, &Reply::Ok, timeouts.io, &request_id).await {
        session.fail(error);
        return;
    }
    match receive_layers(&core, &mut reader, &mut session, timeouts.io).await {
        Ok(first_token_id) => {
            let reply = match session.finish(first_token_id) {
                Ok(()) => Reply::Ok,
                Err(error) => Reply::refusal(&error),
            };
            let _ = write_reply(&mut writer, &reply, timeouts.io, &request_id).await;
        }
        Err(error) => {
            let refusal = session.fail(error);
            refuse_and_drain(&mut reader, &mut writer, &refusal, timeouts.io).await;
        }
    }
}

async fn read_header(
    reader: &mut BufReader<OwnedReadHalf>,
    limit: Duration,
) -> Result<TransferHeader, TransferError> {
    let deadline = Instant::now() + limit;
    let mut prefix = [0u8; HEADER_PREFIX_BYTES];
    read_exact(reader, &mut prefix, remaining(deadline), "", "the header").await?;
    let body_len = wire::parse_header_prefix(&prefix)?;
    let mut body = vec![0u8; body_len + 4];
    read_exact(reader, &mut body, remaining(deadline), "", "the header").await?;
    wire::parse_header_body(&body)
}

/// Reads frames until the end frame; returns its first token.
async fn receive_layers(
    core: &ReceiverCore,
    reader: &mut BufReader<OwnedReadHalf>,
    session: &mut Session,
    io_timeout: Duration,
) -> Result<Option<u32>, TransferError> {
    let request_id = session.header().request_id.clone();
    loop {
        let limit = io_timeout.min(remaining(session.deadline()));
        let waiting_for = format!("for layer {}", session.next_layer());
        let mut prefix = [0u8; FRAME_PREFIX_BYTES];
        read_exact(reader, &mut prefix, limit, &request_id, &waiting_for).await?;
        let (layer, len) = wire::parse_frame_prefix(&prefix);
        if layer == END_FRAME_LAYER {
            if len as usize != END_FRAME_PAYLOAD_BYTES {
                return Err(TransferError::Malformed {
                    context: format!("transfer {request_id}"),
                    detail: format!("end frame of {len} bytes"),
                });
            }
            let mut payload = [0u8; END_FRAME_PAYLOAD_BYTES + 4];
            read_exact(reader, &mut payload, limit, &request_id, "the end frame").await?;
            let (end, crc) = payload.split_at(END_FRAME_PAYLOAD_BYTES);
            let mut end_payload = [0u8; END_FRAME_PAYLOAD_BYTES];
            end_payload.copy_from_slice(end);
            if crc32fast::hash(end) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
                return Err(TransferError::Malformed {
                    context: format!("transfer {request_id}"),
                    detail: "end frame checksum mismatch".into(),
                });
            }
            return wire::parse_end_payload(&end_payload);
        }
        // Length checked against the expected chunk before anything is allocated from it.
        session.check_frame(layer, len as usize)?;
        let len = len as usize;
        let mut payload = core.take_buffer(len);
        // Hashed piece by piece as it arrives, while the bytes are still in cache.
        let mut hasher = crc32fast::Hasher::new();
        let read = tokio::time::timeout(limit, async {
            while payload.len() < len {
                let start = payload.len();
                let left = (len - start) as u64;
                if (&mut *reader).take(left).read_buf(&mut payload).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                hasher.update(&payload[start..]);
            }
            Ok(())
        })
        .await;
        match read {
            Err(_) => return Err(TransferError::timeout(&request_id, waiting_for, limit)),
            Ok(Err(source)) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(TransferError::Malformed {
                    context: format!("transfer {request_id}"),
                    detail: format!(
                        "connection closed inside layer {layer} ({} of {len} bytes)",
                        payload.len()
                    ),
                });
            }
            Ok(Err(source)) => return Err(io_error(&request_id, "reading a layer", source)),
            Ok(Ok(())) => {}
        }
        let mut crc = [0u8; 4];
        read_exact(reader, &mut crc, limit, &request_id, &waiting_for).await?;
        session.accept_hashed_layer(
            layer,
            payload.freeze(),
            hasher.finalize(),
            u32::from_le_bytes(crc),
        )?;
    }
}

/// Sends a refusal, stops writing, and reads on until the sender hangs up (or [`DRAIN_LIMIT`]), so the
/// sender reads the refusal rather than a reset caused by its unread bytes.
async fn refuse_and_drain(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    error: &TransferError,
    io_timeout: Duration,
) {
    if write_reply(writer, &Reply::refusal(error), io_timeout, "")
        .await
        .is_err()
    {
        return;
    }
    let _ = writer.shutdown().await;
    let mut sink = vec![0u8; READ_BUFFER_BYTES];
    let _ = tokio::time::timeout(DRAIN_LIMIT.min(io_timeout), async {
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn write_reply(
    writer: &mut OwnedWriteHalf,
    reply: &Reply,
    limit: Duration,
    request_id: &str,
) -> Result<(), TransferError> {
    write_all(
        writer,
        &reply.encode(),
        limit,
        request_id,
        "writing a reply",
    )
    .await
}

/// The sending side of one TCP transfer, accepted by the receiver.
pub struct TcpOutgoing {
    endpoint: String,
    header: TransferHeader,
    reader: OwnedReadHalf,
    writer: BufWriter<OwnedWriteHalf>,
    timeouts: TransferTimeouts,
    started: Instant,
    next_layer: u32,
}

impl TcpOutgoing {
    async fn connect(
        endpoint: &str,
        header: TransferHeader,
        timeouts: TransferTimeouts,
    ) -> Result<Self, TransferError> {
        let started = Instant::now();
        let header_bytes = header.encode()?;
        let address = split_endpoint(endpoint, "tcp")?;
        let request_id = header.request_id.clone();
        let stream = match tokio::time::timeout(timeouts.handshake, TcpStream::connect(address))
            .await
        {
            Err(_) => {
                return Err(TransferError::timeout(
                    &request_id,
                    format!("connecting to {endpoint}"),
                    timeouts.handshake,
                ));
            }
            Ok(Err(source)) => {
                return Err(io_error(
                    &request_id,
                    &format!(
                        "connecting to {endpoint} (is the decode worker's transfer endpoint up?)"
                    ),
                    source,
                ));
            }
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let mut outgoing = Self {
            endpoint: endpoint.to_owned(),
            header,
            reader,
            writer: BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer),
            timeouts,
            started,
            next_layer: 0,
        };
        let deadline = Instant::now() + timeouts.handshake;
        write_all(
            &mut outgoing.writer,
            &header_bytes,
            remaining(deadline),
            &request_id,
            "sending the header",
        )
        .await?;
        flush(&mut outgoing.writer, remaining(deadline), &request_id).await?;
        outgoing
            .read_reply(remaining(deadline), "for the receiver to accept the header")
            .await?;
        Ok(outgoing)
    }

    /// Reads a reply; a refusal becomes [`TransferError::Refused`].
    async fn read_reply(
        &mut self,
        limit: Duration,
        waiting_for: &str,
    ) -> Result<(), TransferError> {
        let mut prefix = [0u8; REPLY_PREFIX_BYTES];
        self.read_reply_from(&mut prefix, 0, limit, waiting_for)
            .await
    }

    async fn read_reply_from(
        &mut self,
        prefix: &mut [u8; REPLY_PREFIX_BYTES],
        already_read: usize,
        limit: Duration,
        waiting_for: &str,
    ) -> Result<(), TransferError> {
        let deadline = Instant::now() + limit;
        let request_id = self.header.request_id.clone();
        read_exact(
            &mut self.reader,
            &mut prefix[already_read..],
            limit,
            &request_id,
            waiting_for,
        )
        .await
        .map_err(|error| self.closed_if_eof(error))?;
        let (code, reason_len) = wire::parse_reply_prefix(prefix)?;
        let mut reason = vec![0u8; reason_len];
        read_exact(
            &mut self.reader,
            &mut reason,
            remaining(deadline),
            &request_id,
            waiting_for,
        )
        .await?;
        match wire::parse_reply(code, &reason) {
            Reply::Ok => Ok(()),
            refusal => Err(refused(&self.endpoint, &request_id, refusal)),
        }
    }

    fn closed_if_eof(&self, error: TransferError) -> TransferError {
        match error {
            TransferError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                TransferError::ReceiverClosed {
                    request_id: self.header.request_id.clone(),
                    endpoint: self.endpoint.clone(),
                    detail: "the connection closed without a reply".into(),
                }
            }
            other => other,
        }
    }

    /// A receiver that refuses mid-stream answers at once: look for that answer without waiting, so the
    /// sender stops instead of streaming the remaining layers into a drain.
    async fn check_early_reply(&mut self) -> Result<(), TransferError> {
        let mut prefix = [0u8; REPLY_PREFIX_BYTES];
        match self.reader.try_read(&mut prefix) {
            Ok(0) => Err(TransferError::ReceiverClosed {
                request_id: self.header.request_id.clone(),
                endpoint: self.endpoint.clone(),
                detail: "the connection closed mid-transfer".into(),
            }),
            Ok(n) => {
                let result = self
                    .read_reply_from(&mut prefix, n, self.timeouts.io, "for the rest of a reply")
                    .await;
                // A receiver confirms only after the end frame: an early reply that is not a refusal is a
                // protocol error.
                result.and(Err(TransferError::Malformed {
                    context: format!("transfer {}", self.header.request_id),
                    detail: "the receiver confirmed before the end frame".into(),
                }))
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(source) => Err(io_error(&self.header.request_id, "reading a reply", source)),
        }
    }

    /// After a failed write, the receiver's refusal (if it sent one) says why better than the write error.
    async fn explain_write_error(&mut self, error: TransferError) -> TransferError {
        match self
            .read_reply(self.timeouts.io.min(DRAIN_LIMIT), "for a refusal")
            .await
        {
            Err(refusal @ TransferError::Refused { .. }) => refusal,
            _ => error,
        }
    }

    /// Writes one layer frame; hashes the payload piece by piece just before each piece goes to the socket
    /// (cache-hot for the kernel's copy) unless the producer gave its crc32.
    async fn write_layer(
        &mut self,
        bytes: Bytes,
        given_crc32: Option<u32>,
    ) -> Result<(), TransferError> {
        let num_layers = self.header.layout.num_layers as u32;
        let expected = self.header.layer_chunk_bytes();
        if self.next_layer >= num_layers || bytes.len() != expected {
            return Err(self.local_error(format!(
                "layer {} of {num_layers}: {} bytes given, {expected} expected",
                self.next_layer,
                bytes.len()
            )));
        }
        self.check_early_reply().await?;
        let request_id = self.header.request_id.clone();
        let io = self.timeouts.io;
        let prefix = wire::encode_frame_prefix(self.next_layer, bytes.len() as u32);
        let written = async {
            write_all(
                &mut self.writer,
                &prefix,
                io,
                &request_id,
                "sending a layer",
            )
            .await?;
            // The payload goes straight to the socket: through the buffer it would be copied once more.
            flush(&mut self.writer, io, &request_id).await?;
            let mut hasher = crc32fast::Hasher::new();
            for piece in bytes.chunks(HASHED_PIECE_BYTES) {
                if given_crc32.is_none() {
                    hasher.update(piece);
                }
                write_all(
                    self.writer.get_mut(),
                    piece,
                    io,
                    &request_id,
                    "sending a layer",
                )
                .await?;
            }
            let crc32 = given_crc32.unwrap_or_else(|| hasher.finalize());
            write_all(
                &mut self.writer,
                &crc32.to_le_bytes(),
                io,
                &request_id,
                "sending a layer",
            )
            .await?;
            // Flushed per layer: the receiver can verify it while the next one is being produced.
            flush(&mut self.writer, io, &request_id).await
        }
        .await;
        if let Err(error) = written {
            return Err(self.explain_write_error(error).await);
        }
        self.next_layer += 1;
        Ok(())
    }

    fn local_error(&self, detail: String) -> TransferError {
        TransferError::Malformed {
            context: format!("sending transfer {}", self.header.request_id),
            detail,
        }
    }
}

impl OutgoingTransfer for TcpOutgoing {
    fn header(&self) -> &TransferHeader {
        &self.header
    }

    async fn send_layer_with_crc32(
        &mut self,
        bytes: Bytes,
        crc32: u32,
    ) -> Result<(), TransferError> {
        self.write_layer(bytes, Some(crc32)).await
    }

    async fn send_layer(&mut self, bytes: Bytes) -> Result<(), TransferError> {
        self.write_layer(bytes, None).await
    }

    async fn finish(
        mut self,
        first_token_id: Option<u32>,
    ) -> Result<TransferReport, TransferError> {
        let num_layers = self.header.layout.num_layers as u32;
        if self.next_layer != num_layers {
            return Err(self.local_error(format!(
                "finished after {} of {num_layers} layers",
                self.next_layer
            )));
        }
        let request_id = self.header.request_id.clone();
        let io = self.timeouts.io;
        let payload = wire::encode_end_payload(first_token_id);
        let mut frame = Vec::with_capacity(FRAME_PREFIX_BYTES + END_FRAME_PAYLOAD_BYTES + 4);
        frame.extend_from_slice(&wire::encode_frame_prefix(
            END_FRAME_LAYER,
            END_FRAME_PAYLOAD_BYTES as u32,
        ));
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let written = async {
            write_all(
                &mut self.writer,
                &frame,
                io,
                &request_id,
                "sending the end frame",
            )
            .await?;
            flush(&mut self.writer, io, &request_id).await
        }
        .await;
        if let Err(error) = written {
            return Err(self.explain_write_error(error).await);
        }
        self.read_reply(
            self.timeouts.ack,
            "for the receiver to confirm the transfer",
        )
        .await?;
        Ok(TransferReport {
            request_id,
            bytes: self.header.kv_bytes(),
            blocks: self.header.block_ids.len() as u32,
            layers: num_layers,
            duration_ns: self.started.elapsed().as_nanos() as u64,
            transport: TransportKind::Tcp,
        })
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn io_error(request_id: &str, context: &str, source: std::io::Error) -> TransferError {
    TransferError::Io {
        request_id: request_id.to_owned(),
        context: context.to_owned(),
        source,
    }
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    limit: Duration,
    request_id: &str,
    waiting_for: &str,
) -> Result<(), TransferError> {
    match tokio::time::timeout(limit, reader.read_exact(buf)).await {
        Err(_) => Err(TransferError::timeout(
            request_id,
            waiting_for.to_owned(),
            limit,
        )),
        Ok(Err(source)) => Err(io_error(
            request_id,
            &format!("waiting {waiting_for}"),
            source,
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn write_all<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    limit: Duration,
    request_id: &str,
    context: &str,
) -> Result<(), TransferError> {
    match tokio::time::timeout(limit, writer.write_all(bytes)).await {
        Err(_) => Err(TransferError::timeout(
            request_id,
            context.to_owned(),
            limit,
        )),
        Ok(Err(source)) => Err(io_error(request_id, context, source)),
        Ok(Ok(())) => Ok(()),
    }
}

async fn flush<W: AsyncWrite + Unpin>(
    writer: &mut W,
    limit: Duration,
    request_id: &str,
) -> Result<(), TransferError> {
    match tokio::time::timeout(limit, writer.flush()).await {
        Err(_) => Err(TransferError::timeout(request_id, "flushing", limit)),
        Ok(Err(source)) => Err(io_error(request_id, "flushing", source)),
        Ok(Ok(())) => Ok(()),
    }
}
