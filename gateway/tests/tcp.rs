//! The gateway on a real TCP listener, spoken to with raw HTTP/1.1: a client that goes away mid-stream or while
//! waiting for a whole answer cancels its request on the log; a finished request is never cancelled; graceful
//! shutdown ends `serve`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use support::{DecoderBehaviour, MODEL, TestGateway};
use tandem_events::{Body, EventKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn send_request(address: SocketAddr, body: &serde_json::Value) -> TcpStream {
    let body = body.to_string();
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body.as_bytes()).await.expect("write body");
    stream
}

fn long_request(stream: bool) -> serde_json::Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me everything about Roger Federer."}],
        "max_tokens": 2000,
        "ignore_eos": true,
        "stream": stream
    })
}

async fn only_received_id(gateway: &TestGateway) -> String {
    for _ in 0..200 {
        let received: Vec<_> = gateway
            .events()
            .await
            .into_iter()
            .filter(|event| event.kind() == EventKind::Received)
            .collect();
        if let [event] = received.as_slice() {
            return event.id().to_string();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected exactly one Received on the log");
}

async fn assert_cancelled_by_client(gateway: &TestGateway, request_id: &str) {
    let cancelled = gateway
        .wait_for_event(request_id, EventKind::Cancelled)
        .await;
    let Body::Cancelled(cancelled) = cancelled.body() else {
        unreachable!()
    };
    assert_eq!(cancelled.reason, "client_disconnected");
    assert_eq!(cancelled_count(gateway, request_id).await, 1);
}

async fn cancelled_count(gateway: &TestGateway, request_id: &str) -> usize {
    gateway
        .events()
        .await
        .iter()
        .filter(|event| event.id() == request_id && event.kind() == EventKind::Cancelled)
        .count()
}

async fn serve(
    gateway: &mut TestGateway,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (shutdown, shutdown_signal) = tokio::sync::oneshot::channel::<()>();
    let server = gateway.gateway.take().expect("gateway");
    let handle = tokio::spawn(async move {
        server
            .serve(listener, async move {
                let _ = shutdown_signal.await;
            })
            .await
            .expect("serve");
    });
    (address, shutdown, handle)
}

#[tokio::test]
async fn client_gone_mid_stream_cancels_the_request() {
    let behaviour = DecoderBehaviour {
        token_delay: Duration::from_millis(20),
        ..Default::default()
    };
    let mut gateway = TestGateway::start_with(behaviour, |_| {}).await;
    let (address, shutdown, server) = serve(&mut gateway).await;

    let mut stream = send_request(address, &long_request(true)).await;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 4 {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(
            read > 0,
            "server closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    let id_start = text.find("chatcmpl-").expect("chunk id") + "chatcmpl-".len();
    let request_id = text[id_start..id_start + 26].to_string();
    assert_eq!(only_received_id(&gateway).await, request_id);
    assert_eq!(cancelled_count(&gateway, &request_id).await, 0);

    drop(stream);
    assert_cancelled_by_client(&gateway, &request_id).await;

    shutdown.send(()).expect("server running");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("graceful shutdown ends serve")
        .expect("server task");
}

#[tokio::test]
async fn client_gone_while_waiting_for_a_whole_answer_cancels_the_request() {
    let behaviour = DecoderBehaviour {
        token_delay: Duration::from_millis(20),
        ..Default::default()
    };
    let mut gateway = TestGateway::start_with(behaviour, |_| {}).await;
    let (address, shutdown, server) = serve(&mut gateway).await;

    let stream = send_request(address, &long_request(false)).await;
    let request_id = only_received_id(&gateway).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    assert_cancelled_by_client(&gateway, &request_id).await;

    shutdown.send(()).expect("server running");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("graceful shutdown ends serve")
        .expect("server task");
}

#[tokio::test]
async fn a_finished_request_is_not_cancelled() {
    let mut gateway = TestGateway::start().await;
    let (address, shutdown, server) = serve(&mut gateway).await;
    let request = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Who is Roger Federer?"}],
        "stream": true
    });
    let mut stream = send_request(address, &request).await;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: [DONE]") {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(read > 0);
        seen.extend_from_slice(&buffer[..read]);
    }
    drop(stream);
    let request_id = only_received_id(&gateway).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cancelled_count(&gateway, &request_id).await, 0);
    shutdown.send(()).expect("server running");
    server.await.expect("server task");
}
