//! The transfer protocol's device-push mode (`KvDtype::DevicePush`, `KV_TRANSFER.md`) on both transports,
//! without a GPU: a receiver takes a device push only once it offers a device pool (and says so in its
//! endpoint), the frames of a push carry no KV, and the endpoint's pool part never confuses a host sender.
//! The copies themselves are tested on a GPU in `cuda_kv_transfer.rs`.

use std::time::Duration;

use bytes::Bytes;
use tandem_workers::KvLayout;
use tandem_workers::transfer::{
    ExpectedTransfer, InProcessTransport, KvDtype, KvTransport, RefusalCode, TcpTransport,
    TransferError, TransferHeader, TransferTimeouts, send_all, split_device_pool,
};

const POOL: &str = "cudakv1:abc:0000-01-00.0:1:7f00:64:4096:00";

fn timeouts() -> TransferTimeouts {
    TransferTimeouts {
        handshake: Duration::from_secs(10),
        io: Duration::from_secs(10),
        ack: Duration::from_secs(10),
    }
}

fn layout() -> KvLayout {
    KvLayout {
        num_layers: 3,
        num_kv_heads: 2,
        head_dim: 8,
        block_size_tokens: 4,
    }
}

fn expected(request_id: &str) -> ExpectedTransfer {
    ExpectedTransfer {
        request_id: request_id.into(),
        model_fingerprint: 42,
        layout: layout(),
        dtype: KvDtype::F32,
        num_tokens: 10,
        from_token: 0,
        block_ids: vec![5, 6, 7],
    }
}

fn header(expected: &ExpectedTransfer, dtype: KvDtype) -> TransferHeader {
    TransferHeader {
        request_id: expected.request_id.clone(),
        model_fingerprint: expected.model_fingerprint,
        layout: expected.layout,
        dtype,
        num_tokens: expected.num_tokens,
        from_token: expected.from_token,
        block_ids: expected.block_ids.clone(),
        trace_context: String::new(),
    }
}

async fn device_push_needs_an_offered_pool<T: KvTransport>(transport: T, address: &str) {
    let mut receiver = transport.listen(address).await.unwrap();

    // Not offered: a device push is refused as a layout mismatch, before any frame.
    let first = expected("push-1");
    let pending = receiver
        .expect(first.clone(), Duration::from_secs(10))
        .unwrap();
    let layers = vec![Bytes::new(); 3];
    let refused = send_all(
        &transport,
        receiver.endpoint(),
        header(&first, KvDtype::DevicePush),
        layers.clone(),
        Some(1),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            refused,
            TransferError::Refused {
                code: RefusalCode::LayoutMismatch,
                ..
            }
        ),
        "{refused}"
    );
    assert!(pending.wait().await.is_err());

    // Offered: the endpoint names the pool, a sender reaches the same receiver through it, and a push's
    // frames carry nothing.
    let plain = receiver.endpoint().to_owned();
    receiver.offer_device_pool(POOL);
    let offered = receiver.endpoint().to_owned();
    assert_eq!(split_device_pool(&offered), (plain.as_str(), Some(POOL)));
    let second = expected("push-2");
    let pending = receiver
        .expect(second.clone(), Duration::from_secs(10))
        .unwrap();
    let push = header(&second, KvDtype::DevicePush);
    assert_eq!(push.layer_chunk_bytes(), 0);
    let report = send_all(&transport, &offered, push, layers, Some(9))
        .await
        .unwrap();
    assert_eq!(report.bytes, 0);
    let received = pending.wait().await.unwrap();
    assert_eq!(received.header.dtype, KvDtype::DevicePush);
    assert_eq!(received.first_token_id, Some(9));
    assert!(received.layers.iter().all(|layer| layer.is_empty()));

    // A push's empty frames where KV is expected, or KV in a push, are refused as malformed lengths.
    let third = expected("push-3");
    let pending = receiver
        .expect(third.clone(), Duration::from_secs(10))
        .unwrap();
    let not_empty = vec![Bytes::from_static(b"kv"); 3];
    assert!(
        send_all(
            &transport,
            &offered,
            header(&third, KvDtype::DevicePush),
            not_empty,
            None
        )
        .await
        .is_err()
    );
    assert!(pending.wait().await.is_err());

    // A host sender still sends f32 KV to the offered endpoint as before.
    let fourth = expected("host-4");
    let pending = receiver
        .expect(fourth.clone(), Duration::from_secs(10))
        .unwrap();
    let host = header(&fourth, KvDtype::F32);
    let chunk: Vec<u8> = (0..host.layer_chunk_bytes()).map(|i| i as u8).collect();
    let chunks = vec![Bytes::from(chunk.clone()); 3];
    send_all(&transport, &offered, host, chunks, Some(3))
        .await
        .unwrap();
    let received = pending.wait().await.unwrap();
    assert_eq!(received.layers[2], chunk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_device_push_needs_an_offered_pool() {
    device_push_needs_an_offered_pool(TcpTransport::new(timeouts()), "127.0.0.1:0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_device_push_needs_an_offered_pool() {
    device_push_needs_an_offered_pool(InProcessTransport::new(timeouts()), "device-push").await;
}
