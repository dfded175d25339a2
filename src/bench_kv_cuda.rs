//! `tandem bench engine --device cuda:N`, KV transfer part: one long prompt's KV moved by every path a GPU
//! worker has, in GB/s beside the copy ceilings measured in the same run. Device to host is a layer per
//! gather kernel and pinned copy (`Engine::export_kv_layer`); host to device the reverse; TCP is the whole
//! cross-host path (export, loopback socket with its crc32s, import into a second engine); device pushes go
//! straight into a second engine's pool (same GPU; a second GPU of this process where there is one). CUDA
//! IPC between processes is measured by `workers/tests/cuda_kv_transfer.rs`, which needs a second process.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tandem_workers::transfer::engine_io::import_received;
use tandem_workers::transfer::{
    ExpectedTransfer, KvTransport, TcpTransport, TransferHeader, TransferTimeouts, send_all,
};
use tandem_workers::{Ceilings, Engine, EngineConfig, ModelWeights, cuda_device_count};

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn report(label: &str, bytes: u64, seconds: f64, ceiling: &str) -> Value {
    println!(
        "kv transfer {label}: {:.1} MB in {:.2} ms = {:.2} GB/s ({ceiling})",
        bytes as f64 / 1e6,
        seconds * 1e3,
        bytes as f64 / seconds / 1e9
    );
    json!({"path": label, "bytes": bytes, "seconds": seconds, "gb_per_s": bytes as f64 / seconds / 1e9})
}

/// Measures every path for a prompt of `tokens` tokens computed by `source`; `weights` and `config` build the
/// receiving engines.
pub fn bench_kv_transfer(
    source: &mut Engine,
    weights: &ModelWeights,
    config: &EngineConfig,
    ordinal: usize,
    ceilings: &Ceilings,
    prompt: &[u32],
) -> Result<Vec<Value>> {
    let mut results = Vec::new();
    let id = source.add_sequence(prompt)?;
    source.prefill(id)?;
    let layers = source.kv_layout().num_layers;
    let d2h = format!(
        "pinned device->host ceiling {:.1} GB/s",
        ceilings.device_to_host_bytes_per_s / 1e9
    );
    let h2d = format!(
        "pinned host->device ceiling {:.1} GB/s",
        ceilings.host_to_device_bytes_per_s / 1e9
    );
    let copy = format!(
        "device copy ceiling {:.0} GB/s read + write, i.e. {:.0} GB/s moved",
        ceilings.copy_bytes_per_s / 1e9,
        ceilings.copy_bytes_per_s / 2e9
    );

    let mut exported = Vec::new();
    let mut samples = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        // Dropped before the next round, so its pinned buffers are reused as a worker's would be.
        drop(std::mem::take(&mut exported));
        exported = (0..layers)
            .map(|layer| source.export_kv_layer_bytes(id, layer, 0))
            .collect::<Result<Vec<_>, _>>()?;
        samples.push(started.elapsed().as_secs_f64());
    }
    let bytes: u64 = exported.iter().map(|layer| layer.len() as u64).sum();
    results.push(report(
        "device -> pinned host (f32 layers)",
        bytes,
        median(samples),
        &d2h,
    ));

    let mut target = Engine::cuda(weights, config.clone(), ordinal)?;
    let mut samples = Vec::new();
    for _ in 0..3 {
        let target_id = target.add_sequence(prompt)?;
        let started = Instant::now();
        target.import_kv_layers(target_id, 0, &exported)?;
        samples.push(started.elapsed().as_secs_f64());
        target.remove_sequence(target_id)?;
    }
    results.push(report(
        "pinned host -> device (f32 layers)",
        bytes,
        median(samples),
        &h2d,
    ));

    // The cross-host path end to end on loopback: export, TCP with crc32s, import.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("starting a runtime for the TCP transfer")?;
    let transport = TcpTransport::new(TransferTimeouts::default());
    let receiver = runtime.block_on(transport.listen("127.0.0.1:0"))?;
    let mut samples = Vec::new();
    for round in 0..3 {
        let target_id = target.add_sequence(prompt)?;
        let request_id = format!("bench-kv-{round}");
        let expected = ExpectedTransfer::for_sequence(&target, target_id, &request_id, 1)?;
        let block_ids = expected.block_ids.clone();
        let pending = receiver.expect(expected, Duration::from_secs(60))?;
        let started = Instant::now();
        let header = TransferHeader::for_sequence(source, id, &request_id, 1, 0, block_ids, "")?;
        let chunks = (0..layers)
            .map(|layer| source.export_kv_layer_bytes(id, layer, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoint = receiver.endpoint().to_owned();
        let received = runtime.block_on(async {
            let sent = send_all(&transport, &endpoint, header, chunks, None);
            let (sent, received) = tokio::join!(sent, pending.wait());
            sent.map(drop).and(received)
        })?;
        import_received(&mut target, target_id, &received)?;
        samples.push(started.elapsed().as_secs_f64());
        receiver.recycle(received);
        target.remove_sequence(target_id)?;
    }
    results.push(report(
        "device -> pinned host -> TCP loopback -> device (export, send, crc32s, import)",
        bytes,
        median(samples),
        "bound by the host: see KV_TRANSFER.md for the loopback socket's own rate",
    ));

    let mut push = |target: &mut Engine, label: &str| -> Result<()> {
        let target_id = target.add_sequence(prompt)?;
        let handle = target
            .device_kv_handle()?
            .context("a CUDA engine has a device KV handle")?;
        let destination = target.kv_block_ids(target_id)?.to_vec();
        let mut samples = Vec::new();
        let mut moved = 0;
        for _ in 0..5 {
            let started = Instant::now();
            let (bytes, _path) = source.push_kv_to_device(id, 0, &handle, &destination)?;
            samples.push(started.elapsed().as_secs_f64());
            moved = bytes;
        }
        results.push(report(label, moved, median(samples), &copy));
        target.remove_sequence(target_id)?;
        Ok(())
    };
    push(&mut target, "device push, same GPU (bf16 blocks)")?;
    drop(target);
    if cuda_device_count() > 1 {
        let peer_ordinal = if ordinal == 0 { 1 } else { 0 };
        let mut peer = Engine::cuda(weights, config.clone(), peer_ordinal)?;
        push(
            &mut peer,
            &format!("device push, peer cuda:{ordinal} -> cuda:{peer_ordinal} (bf16 blocks)"),
        )?;
    } else {
        println!("kv transfer device push to a peer GPU: not measured (one GPU here)");
    }
    source.remove_sequence(id)?;
    Ok(results)
}
