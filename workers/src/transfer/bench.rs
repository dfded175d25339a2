//! The KV transfer benchmark (`tandem bench kv-transfer`): throughput of whole transfers over TCP on
//! loopback and in process, beside the ceilings measured in the same run on the same buffers: a plain
//! memcpy, a raw loopback socket (no framing, no checks), and crc32 (what the checks cost per pass).
//! Figures are printed, never asserted.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::wire::{KvDtype, TransferHeader};
use super::{
    ExpectedTransfer, InProcessTransport, KvTransport, TcpTransport, TransferError,
    TransferTimeouts, send_all,
};
use crate::kv_cache::layout::KvLayout;

/// A Qwen3-8B-like layer: 8 kv heads of 128 dims, 16-token blocks, f32: 128 KiB per layer per block.
const BENCH_LAYOUT: KvLayout = KvLayout {
    num_layers: 32,
    num_kv_heads: 8,
    head_dim: 128,
    block_size_tokens: 16,
};
const SOCKET_CHUNK_BYTES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct KvTransferBenchOptions {
    /// KV bytes per transfer (rounded down to whole blocks of [`BENCH_LAYOUT`], at least one).
    pub transfer_bytes: usize,
    /// Timed repetitions of each measurement (after one warm-up).
    pub iterations: usize,
}

impl Default for KvTransferBenchOptions {
    fn default() -> Self {
        Self {
            transfer_bytes: 256 << 20,
            iterations: 5,
        }
    }
}

/// One measured line: its best and median throughput in GB/s (10^9 bytes per second).
#[derive(Clone, Debug)]
pub struct BenchLine {
    pub name: &'static str,
    pub best_gb_per_s: f64,
    pub median_gb_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct KvTransferBenchReport {
    pub transfer_bytes: usize,
    pub num_layers: usize,
    pub num_blocks: usize,
    pub iterations: usize,
    pub memcpy: BenchLine,
    pub crc32: BenchLine,
    pub loopback_socket: BenchLine,
    pub tcp_transfer: BenchLine,
    pub in_process_transfer: BenchLine,
}

impl fmt::Display for KvTransferBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "KV transfer: {:.1} MiB per transfer ({} layers x {} blocks of {} tokens, {} kv heads x {} dims, f32), {} timed runs each",
            self.transfer_bytes as f64 / (1 << 20) as f64,
            self.num_layers,
            self.num_blocks,
            BENCH_LAYOUT.block_size_tokens,
            BENCH_LAYOUT.num_kv_heads,
            BENCH_LAYOUT.head_dim,
            self.iterations
        )?;
        writeln!(f, "{:<34} {:>12} {:>12}", "", "best GB/s", "median GB/s")?;
        let lines = [
            (&self.memcpy, "ceiling"),
            (&self.loopback_socket, "ceiling"),
            (&self.crc32, "check cost"),
            (&self.tcp_transfer, ""),
            (&self.in_process_transfer, ""),
        ];
        for (line, note) in lines {
            writeln!(
                f,
                "{:<34} {:>12.2} {:>12.2}  {note}",
                line.name, line.best_gb_per_s, line.median_gb_per_s
            )?;
        }
        writeln!(
            f,
            "tcp transfer / raw loopback socket: {:.0}% (median); in-process transfer / memcpy: {:.0}% (median)",
            100.0 * self.tcp_transfer.median_gb_per_s / self.loopback_socket.median_gb_per_s,
            100.0 * self.in_process_transfer.median_gb_per_s / self.memcpy.median_gb_per_s
        )
    }
}

/// Runs every measurement on the current tokio runtime (use a multi-threaded one: sender and receiver
/// run as separate tasks).
pub async fn run(options: KvTransferBenchOptions) -> Result<KvTransferBenchReport, TransferError> {
    let layer_block_bytes = BENCH_LAYOUT.block_bytes() / BENCH_LAYOUT.num_layers;
    let num_blocks =
        (options.transfer_bytes / (layer_block_bytes * BENCH_LAYOUT.num_layers)).max(1);
    let layer_bytes = num_blocks * layer_block_bytes;
    let transfer_bytes = layer_bytes * BENCH_LAYOUT.num_layers;
    let iterations = options.iterations.max(1);
    // Non-zero, non-repeating-ish bytes, so nothing downstream can shortcut on zeroes.
    let source: Vec<u8> = (0..transfer_bytes)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    let source = Bytes::from(source);

    let memcpy = {
        let mut target = vec![0u8; transfer_bytes];
        measure_sync("memcpy", transfer_bytes, iterations, || {
            target.copy_from_slice(&source);
            std::hint::black_box(&target);
        })
    };
    let crc32 = measure_sync("crc32 (one pass)", transfer_bytes, iterations, || {
        std::hint::black_box(crc32fast::hash(&source));
    });
    let loopback_socket = measure_loopback_socket(&source, iterations).await?;

    let timeouts = TransferTimeouts {
        handshake: Duration::from_secs(10),
        io: Duration::from_secs(30),
        ack: Duration::from_secs(30),
    };
    let layers: Vec<Bytes> = (0..BENCH_LAYOUT.num_layers)
        .map(|layer| source.slice(layer * layer_bytes..(layer + 1) * layer_bytes))
        .collect();
    let tcp_transfer = measure_transport(
        "tcp transfer (loopback)",
        &TcpTransport::new(timeouts),
        "127.0.0.1:0",
        &layers,
        num_blocks,
        iterations,
    )
    .await?;
    let in_process_transfer = measure_transport(
        "in-process transfer",
        &InProcessTransport::new(timeouts),
        "kv-transfer-bench",
        &layers,
        num_blocks,
        iterations,
    )
    .await?;
    Ok(KvTransferBenchReport {
        transfer_bytes,
        num_layers: BENCH_LAYOUT.num_layers,
        num_blocks,
        iterations,
        memcpy,
        crc32,
        loopback_socket,
        tcp_transfer,
        in_process_transfer,
    })
}

/// Times `run` once to warm up, then `iterations` times.
fn measure_sync(
    name: &'static str,
    bytes: usize,
    iterations: usize,
    mut run: impl FnMut(),
) -> BenchLine {
    run();
    let durations = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed()
        })
        .collect();
    summarize(name, bytes, durations)
}

fn summarize(name: &'static str, bytes: usize, durations: Vec<Duration>) -> BenchLine {
    let mut rates: Vec<f64> = durations
        .iter()
        .map(|d| bytes as f64 / d.as_nanos().max(1) as f64)
        .collect();
    rates.sort_by(f64::total_cmp);
    BenchLine {
        name,
        best_gb_per_s: rates.last().copied().unwrap_or(0.0),
        median_gb_per_s: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
    }
}

/// Times `run` once to warm up, then `iterations` times.
async fn measure<F, Fut>(
    name: &'static str,
    bytes: usize,
    iterations: usize,
    mut run: F,
) -> Result<BenchLine, TransferError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), TransferError>>,
{
    run().await?;
    let mut durations = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        run().await?;
        durations.push(started.elapsed());
    }
    Ok(summarize(name, bytes, durations))
}

/// The same bytes through a plain loopback TCP connection in 1 MiB writes, read into a reused buffer.
async fn measure_loopback_socket(
    source: &Bytes,
    iterations: usize,
) -> Result<BenchLine, TransferError> {
    let io = |context: &str, source: std::io::Error| TransferError::Io {
        request_id: "bench".into(),
        context: context.to_owned(),
        source,
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| io("binding loopback", e))?;
    let address = listener
        .local_addr()
        .map_err(|e| io("loopback address", e))?;
    let total = source.len();
    let reader = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let mut buffer = vec![0u8; SOCKET_CHUNK_BYTES];
        // One transfer per measurement (warm-up included); a one-byte ack marks each end.
        for _ in 0..=iterations {
            let mut received = 0;
            while received < total {
                let n = stream.read(&mut buffer).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                received += n;
            }
            stream.write_all(&[1]).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| io("connecting to loopback", e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| io("setting nodelay", e))?;
    let mut durations = Vec::with_capacity(iterations);
    for iteration in 0..=iterations {
        let started = Instant::now();
        for chunk in source.chunks(SOCKET_CHUNK_BYTES) {
            stream
                .write_all(chunk)
                .await
                .map_err(|e| io("writing", e))?;
        }
        let mut ack = [0u8; 1];
        stream
            .read_exact(&mut ack)
            .await
            .map_err(|e| io("reading the ack", e))?;
        // The first round warms up.
        if iteration > 0 {
            durations.push(started.elapsed());
        }
    }
    let line = summarize("raw loopback socket", total, durations);
    match reader.await {
        Ok(Ok(())) => Ok(line),
        Ok(Err(error)) => Err(io("loopback reader", error)),
        Err(error) => Err(io("loopback reader", std::io::Error::other(error))),
    }
}

/// Whole transfers, timed from connecting until the receiver holds every verified layer.
async fn measure_transport<T: KvTransport>(
    name: &'static str,
    transport: &T,
    address: &str,
    layers: &[Bytes],
    num_blocks: usize,
    iterations: usize,
) -> Result<BenchLine, TransferError> {
    let receiver = transport.listen(address).await?;
    let endpoint = receiver.endpoint().to_owned();
    let transfer_bytes = layers.iter().map(Bytes::len).sum();
    let mut attempt = 0u64;
    measure(name, transfer_bytes, iterations, || {
        attempt += 1;
        let request_id = format!("bench-{attempt}");
        let block_ids: Vec<u32> = (0..num_blocks as u32).collect();
        let header = TransferHeader {
            request_id: request_id.clone(),
            model_fingerprint: 1,
            layout: BENCH_LAYOUT,
            dtype: KvDtype::F32,
            num_tokens: (num_blocks * BENCH_LAYOUT.block_size_tokens) as u32,
            from_token: 0,
            block_ids: block_ids.clone(),
            trace_context: String::new(),
        };
        let expected = ExpectedTransfer {
            request_id,
            model_fingerprint: 1,
            layout: BENCH_LAYOUT,
            dtype: KvDtype::F32,
            num_tokens: header.num_tokens,
            from_token: 0,
            block_ids,
        };
        let receiver = &receiver;
        let endpoint = &endpoint;
        async move {
            let pending = receiver.expect(expected, Duration::from_secs(60))?;
            let (sent, received) = tokio::join!(
                send_all(transport, endpoint, header, layers.to_vec(), Some(0)),
                pending.wait()
            );
            sent?;
            // As a decode worker does once the KV is in its engine: the buffers serve the next one.
            receiver.recycle(received?);
            Ok(())
        }
    })
    .await
}
