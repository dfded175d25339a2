//! The KV transfer service: one conformance suite run against both transports (TCP on loopback and in
//! process), hostile bytes on the TCP listener, and the disaggregated flow end to end on two engines:
//! prefill on one, KV streamed layer by layer into the other's reserved blocks, decoding there equal to
//! decoding in place.

mod common;

use std::time::Duration;

use bytes::Bytes;
use tandem_workers::transfer::engine_io::{export_layer, import_received};
use tandem_workers::transfer::wire::{self, KvDtype, TransferHeader};
use tandem_workers::transfer::{
    ExpectedTransfer, InProcessTransport, KvTransport, OutgoingTransfer, RefusalCode, TcpTransport,
    TransferError, TransferTimeouts, TransportKind, model_fingerprint, send_all,
};
use tandem_workers::{Engine, KvLayout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FINGERPRINT: u64 = 0x7A4D_E300_0000_0001;

/// What the suite needs of a transport beyond the trait: building one, and an address to listen on.
trait Harness: KvTransport + Clone + Send + Sync + 'static {
    fn make(timeouts: TransferTimeouts) -> Self;
    fn address(tag: &str) -> String;
}

impl Harness for TcpTransport {
    fn make(timeouts: TransferTimeouts) -> Self {
        TcpTransport::new(timeouts)
    }
    fn address(_tag: &str) -> String {
        "127.0.0.1:0".into()
    }
}

impl Harness for InProcessTransport {
    fn make(timeouts: TransferTimeouts) -> Self {
        InProcessTransport::new(timeouts)
    }
    fn address(tag: &str) -> String {
        format!("decode-{tag}")
    }
}

fn timeouts() -> TransferTimeouts {
    TransferTimeouts {
        handshake: Duration::from_secs(10),
        io: Duration::from_secs(10),
        ack: Duration::from_secs(10),
    }
}

fn short_timeouts() -> TransferTimeouts {
    TransferTimeouts {
        handshake: Duration::from_millis(300),
        io: Duration::from_millis(300),
        ack: Duration::from_millis(300),
    }
}

fn small_layout() -> KvLayout {
    KvLayout {
        num_layers: 3,
        num_kv_heads: 2,
        head_dim: 8,
        block_size_tokens: 4,
    }
}

fn expected(
    request_id: &str,
    layout: KvLayout,
    num_tokens: u32,
    from_token: u32,
) -> ExpectedTransfer {
    let block_size = layout.block_size_tokens as u32;
    let block_ids = (from_token / block_size..num_tokens.div_ceil(block_size))
        .map(|i| 100 + i * 3)
        .collect();
    ExpectedTransfer {
        request_id: request_id.into(),
        model_fingerprint: FINGERPRINT,
        layout,
        dtype: KvDtype::F32,
        num_tokens,
        from_token,
        block_ids,
    }
}

fn header_for(expected: &ExpectedTransfer) -> TransferHeader {
    TransferHeader {
        request_id: expected.request_id.clone(),
        model_fingerprint: expected.model_fingerprint,
        layout: expected.layout,
        dtype: expected.dtype,
        num_tokens: expected.num_tokens,
        from_token: expected.from_token,
        block_ids: expected.block_ids.clone(),
        trace_context: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
    }
}

/// Distinct bytes per layer and per `seed`, so a swapped or mixed-up chunk cannot pass.
fn layers_for(header: &TransferHeader, seed: u32) -> Vec<Bytes> {
    (0..header.layout.num_layers as u32)
        .map(|layer| {
            let bytes: Vec<u8> = (0..header.layer_chunk_bytes() as u32)
                .map(|i| {
                    (i.wrapping_mul(2_654_435_761) ^ layer.wrapping_mul(97) ^ seed.wrapping_mul(31))
                        .to_le_bytes()[2]
                })
                .collect();
            Bytes::from(bytes)
        })
        .collect()
}

fn refusal_code(error: &TransferError) -> Option<RefusalCode> {
    match error {
        TransferError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

async fn round_trip_moves_exact_bytes<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("round-trip")).await.unwrap();
    let scheme = match transport.kind() {
        TransportKind::Tcp => "tcp://",
        TransportKind::InProcess => "inproc://",
    };
    assert!(
        receiver.endpoint().starts_with(scheme),
        "{}",
        receiver.endpoint()
    );
    let expected = expected("req-1", small_layout(), 11, 0);
    let header = header_for(&expected);
    let layers = layers_for(&header, 1);
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let (sent, received) = tokio::join!(
        send_all(
            &transport,
            receiver.endpoint(),
            header.clone(),
            layers.clone(),
            Some(4242)
        ),
        pending.wait()
    );
    let sent = sent.unwrap();
    let received = received.unwrap();
    assert_eq!(received.layers, layers);
    assert_eq!(received.header, header);
    assert_eq!(received.first_token_id, Some(4242));
    let chunk_bytes = 3 * (2 * 2 * 4 * 8 * 4);
    assert_eq!(sent.bytes, 3 * chunk_bytes as u64);
    assert_eq!(sent.blocks, 3);
    assert_eq!(sent.layers, 3);
    assert_eq!(sent.transport, transport.kind());
    assert_eq!(received.report.bytes, sent.bytes);
    assert_eq!(received.report.transport, transport.kind());
    let event = sent.to_event("prefill-1", "decode-1");
    assert_eq!(event.transport, transport.kind().as_str());
    assert_eq!((event.bytes, event.blocks), (sent.bytes, 3));
    assert_eq!(event.duration_ns, sent.duration_ns);
}

async fn layout_mismatch_is_refused_on_both_sides<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("layout")).await.unwrap();
    let expected = expected("req-layout", small_layout(), 8, 0);
    let mut header = header_for(&expected);
    header.layout.head_dim = 16;
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let error = transport
        .connect(receiver.endpoint(), header)
        .await
        .err()
        .expect("a transfer in another layout must be refused");
    assert_eq!(
        refusal_code(&error),
        Some(RefusalCode::LayoutMismatch),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("head dim 16") && message.contains("head dim 8"),
        "{message}"
    );
    let receiver_error = pending.wait().await.unwrap_err();
    assert!(
        matches!(receiver_error, TransferError::LayoutMismatch { .. }),
        "{receiver_error}"
    );
    assert!(message.contains(&receiver_error.to_string()));
}

async fn model_mismatch_is_refused_on_both_sides<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("model")).await.unwrap();
    let expected = expected("req-model", small_layout(), 8, 0);
    let mut header = header_for(&expected);
    header.model_fingerprint ^= 1;
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let error = transport
        .connect(receiver.endpoint(), header)
        .await
        .err()
        .expect("another model's KV must be refused");
    assert_eq!(
        refusal_code(&error),
        Some(RefusalCode::ModelMismatch),
        "{error}"
    );
    assert!(error.to_string().contains("same model"), "{error}");
    assert!(matches!(
        pending.wait().await,
        Err(TransferError::ModelMismatch {
            expected: FINGERPRINT,
            ..
        })
    ));
}

async fn other_destination_blocks_are_refused<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("blocks")).await.unwrap();
    let expected = expected("req-blocks", small_layout(), 8, 0);
    let mut header = header_for(&expected);
    header.block_ids.reverse();
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let error = transport
        .connect(receiver.endpoint(), header)
        .await
        .err()
        .unwrap();
    assert_eq!(
        refusal_code(&error),
        Some(RefusalCode::DestinationMismatch),
        "{error}"
    );
    assert!(matches!(
        pending.wait().await,
        Err(TransferError::DestinationMismatch { .. })
    ));
}

async fn corrupted_chunk_is_refused<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("checksum")).await.unwrap();
    let expected = expected("req-crc", small_layout(), 12, 4);
    let header = header_for(&expected);
    let layers = layers_for(&header, 2);
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let mut outgoing = transport
        .connect(receiver.endpoint(), header)
        .await
        .unwrap();
    outgoing.send_layer(layers[0].clone()).await.unwrap();
    let wrong_crc = crc32fast::hash(&layers[1]) ^ 0x0100;
    // The sender learns of the refusal at the latest from the final reply.
    let result = async {
        outgoing
            .send_layer_with_crc32(layers[1].clone(), wrong_crc)
            .await?;
        outgoing.send_layer(layers[2].clone()).await?;
        outgoing.finish(None).await
    }
    .await;
    let error = result.expect_err("a corrupted layer must be refused");
    assert_eq!(refusal_code(&error), Some(RefusalCode::Checksum), "{error}");
    assert!(error.to_string().contains("layer 1 checksum"), "{error}");
    assert!(matches!(
        pending.wait().await,
        Err(TransferError::Checksum { layer: 1, .. })
    ));
}

async fn unknown_request_is_refused<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("unknown")).await.unwrap();
    let header = header_for(&expected("req-nobody-asked", small_layout(), 8, 0));
    let error = transport
        .connect(receiver.endpoint(), header)
        .await
        .err()
        .unwrap();
    assert_eq!(
        refusal_code(&error),
        Some(RefusalCode::UnknownRequest),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("req-nobody-asked is not expected"),
        "{error}"
    );
}

async fn receiver_times_out_when_no_sender_comes<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("late")).await.unwrap();
    let expected = expected("req-late", small_layout(), 8, 0);
    let header = header_for(&expected);
    let pending = receiver
        .expect(expected, Duration::from_millis(200))
        .unwrap();
    let error = pending.wait().await.unwrap_err();
    assert!(matches!(error, TransferError::Timeout { .. }), "{error}");
    assert!(
        error.to_string().contains("for the KV to arrive"),
        "{error}"
    );
    // The expectation is withdrawn: a sender arriving after the deadline is refused.
    let error = transport
        .connect(receiver.endpoint(), header)
        .await
        .err()
        .unwrap();
    assert_eq!(
        refusal_code(&error),
        Some(RefusalCode::UnknownRequest),
        "{error}"
    );
}

async fn cancelled_transfer_is_refused<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("cancelled")).await.unwrap();
    let expected = expected("req-cancelled", small_layout(), 8, 0);
    let header = header_for(&expected);
    let pending = receiver
        .expect(expected.clone(), Duration::from_secs(10))
        .unwrap();
    assert!(matches!(
        receiver.expect(expected, Duration::from_secs(10)),
        Err(TransferError::AlreadyExpected { .. })
    ));
    drop(pending);
    let error = transport
        .connect(receiver.endpoint(), header)
        .await
        .err()
        .unwrap();
    assert_eq!(
        refusal_code(&error),
        Some(RefusalCode::UnknownRequest),
        "{error}"
    );
}

/// A receiver whose runtime is stuck (a hung process, as far as the sender can tell).
async fn sender_times_out_when_the_receiver_never_answers<T: Harness>() {
    let transport = T::make(short_timeouts());
    let (endpoint_tx, endpoint_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let receiving = transport.clone();
    let stuck = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let receiver = receiving.listen(&T::address("stuck")).await.unwrap();
            let pending = receiver
                .expect(
                    expected("req-stuck", small_layout(), 8, 0),
                    Duration::from_secs(30),
                )
                .unwrap();
            endpoint_tx.send(receiver.endpoint().to_owned()).unwrap();
            // Blocks this runtime's only thread: nothing on it runs until the test lets go.
            let _ = release_rx.recv();
            drop(pending);
        });
    });
    let endpoint = endpoint_rx.recv().unwrap();
    let header = header_for(&expected("req-stuck", small_layout(), 8, 0));
    let started = std::time::Instant::now();
    let error = transport.connect(&endpoint, header).await.err().unwrap();
    assert!(matches!(error, TransferError::Timeout { .. }), "{error}");
    assert!(error.to_string().contains("accept the header"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(20));
    release_tx.send(()).unwrap();
    stuck.join().unwrap();
}

async fn receiver_fails_when_the_sender_disappears<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("vanished")).await.unwrap();
    let expected = expected("req-vanished", small_layout(), 8, 0);
    let header = header_for(&expected);
    let layers = layers_for(&header, 3);
    let pending = receiver.expect(expected, Duration::from_secs(30)).unwrap();
    let mut outgoing = transport
        .connect(receiver.endpoint(), header)
        .await
        .unwrap();
    outgoing.send_layer(layers[0].clone()).await.unwrap();
    drop(outgoing);
    let started = std::time::Instant::now();
    let error = pending.wait().await.unwrap_err();
    assert!(!matches!(error, TransferError::Timeout { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "{error}");
}

async fn concurrent_transfers_to_one_receiver<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("concurrent")).await.unwrap();
    let mut sends = tokio::task::JoinSet::new();
    let mut pendings = Vec::new();
    for index in 0..8u32 {
        let expected = expected(&format!("req-c{index}"), small_layout(), 9 + index * 5, 0);
        let header = header_for(&expected);
        let layers = layers_for(&header, index);
        pendings.push((
            layers.clone(),
            receiver.expect(expected, Duration::from_secs(20)).unwrap(),
        ));
        let transport = transport.clone();
        let endpoint = receiver.endpoint().to_owned();
        sends.spawn(
            async move { send_all(&transport, &endpoint, header, layers, Some(index)).await },
        );
    }
    for (index, (layers, pending)) in pendings.into_iter().enumerate() {
        let received = pending.wait().await.unwrap();
        assert_eq!(received.layers, layers);
        assert_eq!(received.first_token_id, Some(index as u32));
    }
    while let Some(sent) = sends.join_next().await {
        sent.unwrap().unwrap();
    }
}

async fn large_transfer_of_64_mib<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("large")).await.unwrap();
    // 32 layers x 16 blocks x 128 KiB (8 kv heads x 128 dims x 16 tokens x K,V x f32) = 64 MiB.
    let layout = KvLayout {
        num_layers: 32,
        num_kv_heads: 8,
        head_dim: 128,
        block_size_tokens: 16,
    };
    let expected = expected("req-large", layout, 256, 0);
    let header = header_for(&expected);
    assert_eq!(header.kv_bytes(), 64 << 20);
    let layers = layers_for(&header, 9);
    let pending = receiver.expect(expected, Duration::from_secs(60)).unwrap();
    let (sent, received) = tokio::join!(
        send_all(
            &transport,
            receiver.endpoint(),
            header,
            layers.clone(),
            None
        ),
        pending.wait()
    );
    assert_eq!(sent.unwrap().bytes, 64 << 20);
    let received = received.unwrap();
    assert!(received.layers == layers, "64 MiB arrived altered");
    assert_eq!(received.first_token_id, None);
}

async fn recycled_buffers_carry_later_transfers_exactly<T: Harness>() {
    let transport = T::make(timeouts());
    let receiver = transport.listen(&T::address("recycle")).await.unwrap();
    // Larger, then smaller, then larger again: reused buffers must hold exactly the new bytes.
    for (round, num_tokens) in [40u32, 12, 40, 33].into_iter().enumerate() {
        let expected = expected(&format!("req-r{round}"), small_layout(), num_tokens, 0);
        let header = header_for(&expected);
        let layers = layers_for(&header, round as u32 + 20);
        let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
        let (sent, received) = tokio::join!(
            send_all(
                &transport,
                receiver.endpoint(),
                header,
                layers.clone(),
                None
            ),
            pending.wait()
        );
        sent.unwrap();
        let received = received.unwrap();
        assert_eq!(received.layers, layers, "round {round}");
        receiver.recycle(received);
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod tcp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<tandem_workers::transfer::TcpTransport>().await;
                }
            )*
        }
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<tandem_workers::transfer::InProcessTransport>().await;
                }
            )*
        }
    };
}

conformance!(
    round_trip_moves_exact_bytes,
    layout_mismatch_is_refused_on_both_sides,
    model_mismatch_is_refused_on_both_sides,
    other_destination_blocks_are_refused,
    corrupted_chunk_is_refused,
    unknown_request_is_refused,
    receiver_times_out_when_no_sender_comes,
    cancelled_transfer_is_refused,
    sender_times_out_when_the_receiver_never_answers,
    receiver_fails_when_the_sender_disappears,
    concurrent_transfers_to_one_receiver,
    large_transfer_of_64_mib,
    recycled_buffers_carry_later_transfers_exactly,
);

/// Reads one reply off a raw connection.
async fn read_raw_reply(stream: &mut tokio::net::TcpStream) -> wire::Reply {
    let mut prefix = [0u8; wire::REPLY_PREFIX_BYTES];
    stream.read_exact(&mut prefix).await.unwrap();
    let (code, len) = wire::parse_reply_prefix(&prefix).unwrap();
    let mut reason = vec![0u8; len];
    stream.read_exact(&mut reason).await.unwrap();
    wire::parse_reply(code, &reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_refuses_garbage_and_keeps_serving() {
    let transport = TcpTransport::new(timeouts());
    let receiver = transport.listen("127.0.0.1:0").await.unwrap();
    let address = receiver.endpoint().trim_start_matches("tcp://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: decode\r\n\r\n")
        .await
        .unwrap();
    match read_raw_reply(&mut stream).await {
        wire::Reply::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::Malformed);
            assert!(reason.contains("bad magic"), "{reason}");
        }
        wire::Reply::Ok => panic!("garbage accepted"),
    }
    drop(stream);
    round_trip_on(&transport, &receiver, "req-after-garbage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frame_announcing_a_huge_chunk_is_refused_before_allocating() {
    let transport = TcpTransport::new(timeouts());
    let receiver = transport.listen("127.0.0.1:0").await.unwrap();
    let expected = expected("req-huge", small_layout(), 8, 0);
    let header = header_for(&expected);
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let address = receiver.endpoint().trim_start_matches("tcp://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.write_all(&header.encode().unwrap()).await.unwrap();
    assert_eq!(read_raw_reply(&mut stream).await, wire::Reply::Ok);
    stream
        .write_all(&wire::encode_frame_prefix(0, u32::MAX))
        .await
        .unwrap();
    match read_raw_reply(&mut stream).await {
        wire::Reply::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::Malformed);
            assert!(reason.contains("4294967295 bytes"), "{reason}");
        }
        wire::Reply::Ok => panic!("a 4 GiB chunk accepted"),
    }
    assert!(matches!(
        pending.wait().await,
        Err(TransferError::Malformed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_unsupported_version_is_refused_with_the_supported_one() {
    let transport = TcpTransport::new(timeouts());
    let receiver = transport.listen("127.0.0.1:0").await.unwrap();
    let header = header_for(&expected("req-v2", small_layout(), 8, 0));
    let mut bytes = header.encode().unwrap();
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    let address = receiver.endpoint().trim_start_matches("tcp://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    match read_raw_reply(&mut stream).await {
        wire::Reply::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::UnsupportedVersion);
            assert!(
                reason.contains("version 2") && reason.contains("speaks 1"),
                "{reason}"
            );
        }
        wire::Reply::Ok => panic!("version 2 accepted"),
    }
}

async fn round_trip_on<T: KvTransport>(
    transport: &T,
    receiver: &tandem_workers::transfer::KvReceiver,
    request_id: &str,
) {
    let expected = expected(request_id, small_layout(), 5, 0);
    let header = header_for(&expected);
    let layers = layers_for(&header, 5);
    let pending = receiver.expect(expected, Duration::from_secs(10)).unwrap();
    let (sent, received) = tokio::join!(
        send_all(transport, receiver.endpoint(), header, layers.clone(), None),
        pending.wait()
    );
    sent.unwrap();
    assert_eq!(received.unwrap().layers, layers);
}

// The disaggregated flow on two engines of one small checkpoint.

const MODEL: &str = "tiny_f32_untied_t5";

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as u32
}

fn greedy(engine: &mut Engine, id: u64, first_token: u32, steps: usize) -> Vec<u32> {
    let mut tokens = vec![first_token];
    for _ in 0..steps {
        let logits = engine.decode(&[(id, *tokens.last().unwrap())]).unwrap();
        tokens.push(argmax(logits));
    }
    tokens
}

/// Prefill on `prefill` (in place: it decodes on afterwards), stream the KV over TCP layer by layer into
/// a fresh sequence of `decode` for the same prompt, and return both greedy continuations and the report.
async fn disaggregated_vs_in_place(
    prefill: &mut Engine,
    decode: &mut Engine,
    prompt: &[u32],
) -> (
    Vec<u32>,
    Vec<u32>,
    tandem_workers::transfer::TransferReport,
    u32,
) {
    let transport = TcpTransport::new(timeouts());
    let receiver = transport.listen("127.0.0.1:0").await.unwrap();
    let fingerprint = model_fingerprint(decode.model_config(), MODEL.as_bytes());

    // Decode side: reserve blocks for the prompt, announce the transfer.
    let decode_id = decode.add_sequence(prompt).unwrap();
    let expected =
        ExpectedTransfer::for_sequence(decode, decode_id, "req-e2e", fingerprint).unwrap();
    let from_token = expected.from_token;
    let block_ids = expected.block_ids.clone();
    let pending = receiver.expect(expected, Duration::from_secs(30)).unwrap();

    // Prefill side: open the transfer first (the handshake overlaps the compute), prefill, then stream.
    let prefill_id = prefill.add_sequence(prompt).unwrap();
    let header = TransferHeader::for_sequence(
        prefill,
        prefill_id,
        "req-e2e",
        model_fingerprint(prefill.model_config(), MODEL.as_bytes()),
        from_token,
        block_ids,
        "",
    )
    .unwrap();
    let receiving = tokio::spawn(pending.wait());
    let mut outgoing = transport
        .connect(receiver.endpoint(), header.clone())
        .await
        .unwrap();
    let first_token = argmax(prefill.prefill(prefill_id).unwrap());
    for layer in 0..header.layout.num_layers {
        let chunk = export_layer(prefill, prefill_id, &header, layer).unwrap();
        outgoing.send_layer(chunk).await.unwrap();
    }
    let report = outgoing.finish(Some(first_token)).await.unwrap();
    let in_place = greedy(prefill, prefill_id, first_token, 12);

    let received = receiving.await.unwrap().unwrap();
    import_received(decode, decode_id, &received).unwrap();
    let disaggregated = greedy(decode, decode_id, received.first_token_id.unwrap(), 12);
    (in_place, disaggregated, report, from_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_streamed_into_reserved_blocks_decodes_like_in_place() {
    let prompt = common::long_prompt(MODEL)[..90].to_vec();
    let mut prefill = common::engine(MODEL, common::small_config());
    let mut decode = common::engine(MODEL, common::small_config());
    let (in_place, disaggregated, report, from_token) =
        disaggregated_vs_in_place(&mut prefill, &mut decode, &prompt).await;
    assert_eq!(from_token, 0);
    assert_eq!(disaggregated, in_place);
    let layout = decode.kv_layout();
    assert_eq!(report.blocks, 6);
    assert_eq!(report.bytes, (6 * layout.block_bytes()) as u64);
    assert_eq!(report.transport, TransportKind::Tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_uncached_part_moves_when_the_decode_side_has_the_prefix() {
    let prompt = common::long_prompt(MODEL)[..90].to_vec();
    let mut prefill = common::engine(MODEL, common::small_config());
    let mut decode = common::engine(MODEL, common::small_config());
    // The decode side computed an earlier prompt sharing the first 40 tokens: 2 full blocks are cached.
    let mut earlier = prompt[..40].to_vec();
    earlier.extend([7, 8, 9]);
    let earlier_id = decode.add_sequence(&earlier).unwrap();
    decode.prefill(earlier_id).unwrap();
    decode.remove_sequence(earlier_id).unwrap();

    let (in_place, disaggregated, report, from_token) =
        disaggregated_vs_in_place(&mut prefill, &mut decode, &prompt).await;
    assert_eq!(from_token, 32);
    assert_eq!(disaggregated, in_place);
    let layout = decode.kv_layout();
    assert_eq!(report.blocks, 4, "blocks 2..6 of 90 tokens in blocks of 16");
    assert_eq!(report.bytes, (4 * layout.block_bytes()) as u64);
}

#[test]
fn import_refuses_kv_that_does_not_fit_the_reserved_sequence() {
    let prompt = common::long_prompt(MODEL)[..40].to_vec();
    let mut prefill = common::engine(MODEL, common::small_config());
    let mut decode = common::engine(MODEL, common::small_config());
    let prefill_id = prefill.add_sequence(&prompt).unwrap();
    prefill.prefill(prefill_id).unwrap();
    let num_layers = prefill.kv_layout().num_layers;
    let layers: Vec<Vec<u8>> = (0..num_layers)
        .map(|layer| prefill.export_kv_layer(prefill_id, layer, 0).unwrap())
        .collect();
    assert!(prefill.export_kv_layer(prefill_id, num_layers, 0).is_err());
    assert!(prefill.export_kv_layer(prefill_id, 0, 5).is_err());

    let decode_id = decode.add_sequence(&prompt).unwrap();
    // Wrong start, too few layers, a short layer: each refused, nothing marked computed.
    assert!(decode.import_kv_layers(decode_id, 16, &layers).is_err());
    assert!(decode.import_kv_layers(decode_id, 0, &layers[1..]).is_err());
    let mut short = layers.clone();
    short[1].pop();
    assert!(decode.import_kv_layers(decode_id, 0, &short).is_err());
    assert!(
        decode.decode(&[(decode_id, 1)]).is_err(),
        "still not prefilled"
    );
    decode.import_kv_layers(decode_id, 0, &layers).unwrap();
    // Imported twice would overwrite computed KV: refused.
    assert!(decode.import_kv_layers(decode_id, 0, &layers).is_err());
    assert_eq!(decode.kv_block_ids(decode_id).unwrap().len(), 3);
    decode.decode(&[(decode_id, 1)]).unwrap();
}
