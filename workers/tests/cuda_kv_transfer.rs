//! The CUDA backend's KV transfer paths, on a random model of the Qwen3-0.6B shape. Skips, saying why, where
//! no CUDA driver or GPU exists.
//!
//! - A layer export (one gather kernel and one pinned copy per layer) equals the blocks read one by one, and
//!   imported into another engine (one scatter kernel per layer) continues exactly as the source does.
//! - A push straight into another engine's device pool continues exactly as the source does: on the same
//!   GPU (device copy), on a second GPU where there is one (peer copy), and into another process on the same
//!   GPU through CUDA IPC (this test binary started again as the receiving process).
//!
//! "Exactly": the KV bits moved are the source's, so the receiver's greedy tokens equal the source's and its
//! logits are bit-equal. Each path prints its throughput (informative only; nothing asserts on a timing).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;

use common::driver_or_skip;
use tandem_workers::{
    Engine, EngineConfig, ModelWeights, cuda_device_count, qwen3_shape, random_model,
};

const BLOCK_TOKENS: usize = 16;
const DECODE_STEPS: usize = 8;
/// Set in the receiving process of the IPC test.
const CHILD_ENV: &str = "TANDEM_CUDA_IPC_CHILD";

fn weights() -> ModelWeights {
    let shape = qwen3_shape("qwen3-0.6b").expect("the qwen3-0.6b shape");
    random_model(shape, 11)
}

fn engine(weights: &ModelWeights, ordinal: usize) -> Engine {
    let config = EngineConfig {
        block_size_tokens: BLOCK_TOKENS,
        num_blocks: 1024,
        prefill_chunk_tokens: 4096,
        prefix_caching: false,
    };
    Engine::cuda(weights, config, ordinal).expect("a CUDA engine")
}

/// A prompt that ends mid-block.
fn prompt(len: usize) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((i * 2_654_435_761 + 29) % 151_936) as u32)
        .collect()
}

/// Greedy tokens and the last step's logits of `DECODE_STEPS` steps from `first`.
fn continue_greedy(engine: &mut Engine, id: u64, first: u32) -> (Vec<u32>, Vec<f32>) {
    let mut tokens = vec![first];
    let mut logits = Vec::new();
    for _ in 0..DECODE_STEPS {
        logits = engine
            .decode(&[(id, *tokens.last().unwrap())])
            .unwrap()
            .to_vec();
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(index, _)| index as u32)
            .unwrap();
        tokens.push(best);
    }
    (tokens, logits)
}

/// The source: a prefilled prompt, its first greedy token, and where its KV is.
fn prefill(engine: &mut Engine, len: usize) -> (u64, u32) {
    let id = engine.add_sequence(&prompt(len)).unwrap();
    let vocab = engine.model_config().vocab_size;
    let logits = engine.prefill(id).unwrap();
    let row = &logits[logits.len() - vocab..];
    let first = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)));
    (id, first.unwrap() as u32)
}

#[test]
fn layer_export_and_import_round_trip_on_the_gpu() {
    if !driver_or_skip("layer_export_and_import_round_trip_on_the_gpu") {
        return;
    }
    let weights = weights();
    let (mut source, mut target) = (engine(&weights, 0), engine(&weights, 0));
    let len = 1000;
    let (id, first) = prefill(&mut source, len);
    let layout = source.kv_layout();
    let layer_bytes = layout.block_bytes() / layout.num_layers;

    // Against the whole-block export (one block at a time through `read_block`).
    let whole = source.export_kv(id).unwrap();
    let blocks_start = whole.len() - len.div_ceil(BLOCK_TOKENS) * layout.block_bytes();
    let started = Instant::now();
    let layers: Vec<Vec<u8>> = (0..layout.num_layers)
        .map(|layer| source.export_kv_layer(id, layer, 0).unwrap())
        .collect();
    let export_seconds = started.elapsed().as_secs_f64();
    for (layer, chunk) in layers.iter().enumerate() {
        for (block, part) in chunk.chunks_exact(layer_bytes).enumerate() {
            let start = blocks_start + block * layout.block_bytes() + layer * layer_bytes;
            assert!(
                part == &whole[start..start + layer_bytes],
                "layer {layer} block {block} differs from the block export"
            );
        }
    }
    // From a cached prefix on: only the later blocks.
    let later = source.export_kv_layer(id, 3, 2 * BLOCK_TOKENS).unwrap();
    assert_eq!(later[..], layers[3][2 * layer_bytes..]);

    let target_id = target.add_sequence(&prompt(len)).unwrap();
    let started = Instant::now();
    target.import_kv_layers(target_id, 0, &layers).unwrap();
    let import_seconds = started.elapsed().as_secs_f64();
    let bytes: usize = layers.iter().map(Vec::len).sum();
    eprintln!(
        "layer export (device -> pinned host, f32): {:.1} MB in {:.2} ms = {:.2} GB/s; import {:.2} ms = {:.2} GB/s",
        bytes as f64 / 1e6,
        export_seconds * 1e3,
        bytes as f64 / export_seconds / 1e9,
        import_seconds * 1e3,
        bytes as f64 / import_seconds / 1e9
    );
    let expected = continue_greedy(&mut source, id, first);
    assert_eq!(continue_greedy(&mut target, target_id, first), expected);
}

/// Pushes the source's prompt into `target`'s reserved blocks `repeats` times (the same bytes each time),
/// checks that the target continues exactly as the source, and prints the median push's throughput.
fn push_and_check(source: &mut Engine, target: &mut Engine, expected_path: &str, len: usize) {
    let (id, first) = prefill(source, len);
    let target_id = target.add_sequence(&prompt(len)).unwrap();
    let handle = target.device_kv_handle().unwrap().expect("a device handle");
    let destination = target.kv_block_ids(target_id).unwrap().to_vec();
    let mut seconds = Vec::new();
    let mut moved = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let (bytes, path) = source
            .push_kv_to_device(id, 0, &handle, &destination)
            .unwrap();
        seconds.push(started.elapsed().as_secs_f64());
        assert_eq!(path, expected_path);
        moved = bytes;
    }
    target.accept_pushed_kv(target_id, 0).unwrap();
    let first_push = seconds[0];
    seconds.sort_by(f64::total_cmp);
    eprintln!(
        "push {expected_path}: {:.1} MB, median {:.3} ms = {:.1} GB/s (first, opening included: {:.3} ms)",
        moved as f64 / 1e6,
        seconds[2] * 1e3,
        moved as f64 / seconds[2] / 1e9,
        first_push * 1e3
    );
    let expected = continue_greedy(source, id, first);
    assert_eq!(continue_greedy(target, target_id, first), expected);
}

#[test]
fn push_to_a_pool_on_the_same_gpu_and_to_a_peer_gpu() {
    if !driver_or_skip("push_to_a_pool_on_the_same_gpu_and_to_a_peer_gpu") {
        return;
    }
    let weights = weights();
    let mut source = engine(&weights, 0);
    let mut same = engine(&weights, 0);
    push_and_check(&mut source, &mut same, "cuda_same_device", 4000);
    drop(same);
    if cuda_device_count() < 2 {
        eprintln!("skipping the peer copy: one GPU on this machine");
        return;
    }
    let mut peer = engine(&weights, 1);
    push_and_check(&mut source, &mut peer, "cuda_peer", 4000);
}

/// The receiving process of `push_through_cuda_ipc_to_another_process`, which starts it with `CHILD_ENV` set.
/// Protocol on stdin/stdout, one line each: it prints `HANDLE <handle> <block ids, comma-separated>`, waits
/// for `PUSHED <first token>`, then prints `TOKENS <greedy tokens>` and `LOGITS <bits of the last logits>`.
#[test]
#[ignore = "the receiving process of push_through_cuda_ipc_to_another_process, which starts it"]
fn ipc_receiving_process() {
    let len: usize = std::env::var(CHILD_ENV)
        .expect("started by push_through_cuda_ipc_to_another_process")
        .parse()
        .unwrap();
    let started = Instant::now();
    let progress = |what: &str| {
        eprintln!(
            "[receiving process, {:.1}s] {what}",
            started.elapsed().as_secs_f64()
        )
    };
    let weights = weights();
    let mut target = engine(&weights, 0);
    progress("engine ready");
    let id = target.add_sequence(&prompt(len)).unwrap();
    let handle = target.device_kv_handle().unwrap().unwrap();
    let blocks: Vec<String> = target
        .kv_block_ids(id)
        .unwrap()
        .iter()
        .map(u32::to_string)
        .collect();
    println!("HANDLE {handle} {}", blocks.join(","));
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    progress("handle announced");
    std::io::stdin().read_line(&mut line).unwrap();
    progress("told the KV is pushed");
    let first: u32 = line
        .trim()
        .strip_prefix("PUSHED ")
        .expect("PUSHED <token>")
        .parse()
        .unwrap();
    target.accept_pushed_kv(id, 0).unwrap();
    let (tokens, logits) = continue_greedy(&mut target, id, first);
    progress("decoded");
    let tokens: Vec<String> = tokens.iter().map(u32::to_string).collect();
    println!("TOKENS {}", tokens.join(","));
    let checksum = logits
        .iter()
        .fold(0u64, |acc, x| acc.rotate_left(5) ^ x.to_bits() as u64);
    println!("LOGITS {checksum}");
    std::io::stdout().flush().unwrap();
}

#[test]
fn push_through_cuda_ipc_to_another_process() {
    if !driver_or_skip("push_through_cuda_ipc_to_another_process")
        || std::env::var(CHILD_ENV).is_ok()
    {
        return;
    }
    let len = 4000;
    let started = Instant::now();
    let progress = |what: &str| {
        eprintln!(
            "[sending process, {:.1}s] {what}",
            started.elapsed().as_secs_f64()
        )
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "ipc_receiving_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, len.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the receiving process");
    // A receiving process that hangs would hang this test: end it after a generous while (the test then
    // fails reading its output).
    let child_id = child.id().to_string();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        eprintln!("the receiving process {child_id} is still running after 120 s: ending it");
        let _ = Command::new("kill").args(["-9", &child_id]).status();
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = |prefix: &str| -> String {
        for line in lines.by_ref() {
            let line = line.unwrap();
            // The test harness's "test ipc_receiving_process ... " has no line end: a line may start with it.
            if let Some((_, rest)) = line.split_once(prefix) {
                return rest.to_owned();
            }
        }
        panic!("the receiving process ended before printing {prefix}");
    };
    let weights = weights();
    let mut source = engine(&weights, 0);
    let (id, first) = prefill(&mut source, len);
    progress("prefilled");
    let announced = next_line("HANDLE ");
    progress("got the handle");
    let (handle, blocks) = announced.split_once(' ').unwrap();
    let destination: Vec<u32> = blocks.split(',').map(|b| b.parse().unwrap()).collect();
    let mut seconds = Vec::new();
    let mut moved = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let (bytes, path) = source
            .push_kv_to_device(id, 0, handle, &destination)
            .unwrap();
        seconds.push(started.elapsed().as_secs_f64());
        assert_eq!(path, "cuda_ipc");
        moved = bytes;
    }
    progress("pushed");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "PUSHED {first}").unwrap();
    stdin.flush().unwrap();
    let tokens = next_line("TOKENS ");
    let logits = next_line("LOGITS ");
    assert!(child.wait().unwrap().success());
    let first_push = seconds[0];
    seconds.sort_by(f64::total_cmp);
    eprintln!(
        "push cuda_ipc (another process, same GPU): {:.1} MB, median {:.3} ms = {:.1} GB/s (first, opening the handle included: {:.3} ms)",
        moved as f64 / 1e6,
        seconds[2] * 1e3,
        moved as f64 / seconds[2] / 1e9,
        first_push * 1e3
    );
    let (expected_tokens, expected_logits) = continue_greedy(&mut source, id, first);
    let expected: Vec<String> = expected_tokens.iter().map(u32::to_string).collect();
    assert_eq!(tokens, expected.join(","));
    let checksum = expected_logits
        .iter()
        .fold(0u64, |acc, x| acc.rotate_left(5) ^ x.to_bits() as u64);
    assert_eq!(logits, checksum.to_string());
}

/// The prefill -> decode push as the roles run it when both ends are GPUs: the decode side offers its pool
/// in its TCP endpoint, the sender's header says `DevicePush`, the copy goes between the accepted header
/// and the empty layer frames, and `import_received` marks the prompt computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_push_through_the_transfer_protocol() {
    use tandem_workers::transfer::engine_io::import_received;
    use tandem_workers::transfer::{
        ExpectedTransfer, KvDtype, KvTransport, OutgoingTransfer, TcpTransport, TransferHeader,
        TransferTimeouts, split_device_pool,
    };
    if !driver_or_skip("device_push_through_the_transfer_protocol") {
        return;
    }
    let weights = weights();
    let (mut source, mut target) = (engine(&weights, 0), engine(&weights, 0));
    let len = 300;
    let (id, first) = prefill(&mut source, len);
    let target_id = target.add_sequence(&prompt(len)).unwrap();

    let transport = TcpTransport::new(TransferTimeouts::default());
    let mut receiver = transport.listen("127.0.0.1:0").await.unwrap();
    receiver.offer_device_pool(&target.device_kv_handle().unwrap().unwrap());
    let expected = ExpectedTransfer::for_sequence(&target, target_id, "req-push", 7).unwrap();
    let pending = receiver
        .expect(expected.clone(), std::time::Duration::from_secs(30))
        .unwrap();

    let endpoint = receiver.endpoint().to_owned();
    let pool = split_device_pool(&endpoint)
        .1
        .expect("the endpoint names a pool");
    assert!(tandem_workers::device_pool_reachable(pool));
    let mut header = TransferHeader::for_sequence(
        &source,
        id,
        "req-push",
        7,
        0,
        expected.block_ids.clone(),
        "",
    )
    .unwrap();
    header.dtype = KvDtype::DevicePush;
    let layers = header.layout.num_layers;
    let mut outgoing = transport.connect(&endpoint, header).await.unwrap();
    let (bytes, path) = source
        .push_kv_to_device(id, 0, pool, &expected.block_ids)
        .unwrap();
    assert_eq!(path, "cuda_same_device");
    assert_eq!(
        bytes,
        (expected.block_ids.len() * target.kv_layout().block_bytes() / 2) as u64
    );
    for _ in 0..layers {
        outgoing.send_layer(bytes::Bytes::new()).await.unwrap();
    }
    outgoing.finish(Some(first)).await.unwrap();
    let received = pending.wait().await.unwrap();
    assert_eq!(received.first_token_id, Some(first));
    import_received(&mut target, target_id, &received).unwrap();

    let expected_continuation = continue_greedy(&mut source, id, first);
    assert_eq!(
        continue_greedy(&mut target, target_id, first),
        expected_continuation
    );
}
