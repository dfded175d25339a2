//! The KV transfer benchmark (`tandem bench kv-transfer`, `cargo bench -p tandem-workers --bench
//! kv_transfer`): throughput of whole transfers over TCP on loopback and in process, beside what is
//! measured in the same run on the same bytes: a raw loopback socket (the ceiling for TCP: no framing, no
//! checks), a plain memcpy (the reference for in process, which hands chunks over without copying), and one
//! crc32 pass (what the checks cost). Rounds interleave all five. Figures are printed, never asserted.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::wire::{KvDtype, TransferHeader};
use super::{
    ExpectedTransfer, InProcessTransport, KvReceiver, KvTransport, TcpTransport, TransferError,
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
            (&self.memcpy, "reference: a copy into warm memory"),
            (
                &self.loopback_socket,
                "ceiling for tcp: no framing, no checks",
            ),
            (&self.crc32, "the check: one pass per side"),
            (
                &self.tcp_transfer,
                "framed, crc32 both sides, receiver owns the bytes",
            ),
            (
                &self.in_process_transfer,
                "chunks handed over (no copy), crc32 both sides",
            ),
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
            "medians: tcp transfer = {:.0}% of the raw loopback socket; in-process transfer = {:.0}% of memcpy \
             (it copies nothing, so this can pass 100%: two crc32 passes bound it)",
            100.0 * self.tcp_transfer.median_gb_per_s / self.loopback_socket.median_gb_per_s,
            100.0 * self.in_process_transfer.median_gb_per_s / self.memcpy.median_gb_per_s
        )
    }
}

/// Runs every measurement on the current tokio runtime (use a multi-threaded one: sender and receiver
/// run as separate tasks). Rounds interleave the five measurements, so a busy machine slows a transport
/// and its ceiling alike; the first round warms up and is not counted.
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
    let layers: Vec<Bytes> = (0..BENCH_LAYOUT.num_layers)
        .map(|layer| source.slice(layer * layer_bytes..(layer + 1) * layer_bytes))
        .collect();
    let mut target = vec![0u8; transfer_bytes];

    let timeouts = TransferTimeouts {
        handshake: Duration::from_secs(10),
        io: Duration::from_secs(30),
        ack: Duration::from_secs(30),
    };
    // Room for one whole transfer, as a decode worker would size it for the KV it receives at once.
    let tcp = TcpTransport::new(timeouts).with_receive_pool_bytes(transfer_bytes);
    let tcp_receiver = tcp.listen("127.0.0.1:0").await?;
    let in_process = InProcessTransport::new(timeouts);
    let in_process_receiver = in_process.listen("kv-transfer-bench").await?;
    let mut loopback = LoopbackSocket::connect(transfer_bytes, iterations + 1).await?;

    let mut durations: [Vec<Duration>; 5] = Default::default();
    for round in 0..=iterations {
        let started = Instant::now();
        target.copy_from_slice(&source);
        std::hint::black_box(&target);
        let memcpy = started.elapsed();

        let started = Instant::now();
        std::hint::black_box(crc32fast::hash(&source));
        let crc32 = started.elapsed();

        let socket = loopback.round(&source).await?;
        let tcp_transfer = time_transfer(&tcp, &tcp_receiver, &layers, num_blocks, round).await?;
        let in_process_transfer = time_transfer(
            &in_process,
            &in_process_receiver,
            &layers,
            num_blocks,
            round,
        )
        .await?;
        if round > 0 {
            for (list, duration) in
                durations
                    .iter_mut()
                    .zip([memcpy, crc32, socket, tcp_transfer, in_process_transfer])
            {
                list.push(duration);
            }
        }
    }
    loopback.close().await?;
    let [memcpy, crc32, socket, tcp_transfer, in_process_transfer] = durations;
    Ok(KvTransferBenchReport {
        transfer_bytes,
        num_layers: BENCH_LAYOUT.num_layers,
        num_blocks,
        iterations,
        memcpy: summarize("memcpy", transfer_bytes, memcpy),
        crc32: summarize("crc32 (one pass)", transfer_bytes, crc32),
        loopback_socket: summarize("raw loopback socket", transfer_bytes, socket),
        tcp_transfer: summarize("tcp transfer (loopback)", transfer_bytes, tcp_transfer),
        in_process_transfer: summarize("in-process transfer", transfer_bytes, in_process_transfer),
    })
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

fn bench_io(context: &str, source: std::io::Error) -> TransferError {
    TransferError::Io {
        request_id: "bench".into(),
        context: context.to_owned(),
        source,
    }
}

/// The ceiling for TCP: the same bytes through a plain loopback connection in 1 MiB writes, read into a
/// reused buffer, with no framing and no checks; a one-byte ack marks the end of each round.
struct LoopbackSocket {
    stream: TcpStream,
    reader: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LoopbackSocket {
    async fn connect(round_bytes: usize, rounds: usize) -> Result<Self, TransferError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| bench_io("binding loopback", e))?;
        let address = listener
            .local_addr()
            .map_err(|e| bench_io("loopback address", e))?;
        let reader = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let mut buffer = vec![0u8; SOCKET_CHUNK_BYTES];
            for _ in 0..rounds {
                let mut received = 0;
                while received < round_bytes {
                    let n = stream.read(&mut buffer).await?;
                    if n == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    }
                    received += n;
                }
                stream.write_all(&[1]).await?;
            }
            Ok(())
        });
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| bench_io("connecting to loopback", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| bench_io("setting nodelay", e))?;
        Ok(Self { stream, reader })
    }

    async fn round(&mut self, source: &[u8]) -> Result<Duration, TransferError> {
        let started = Instant::now();
        for chunk in source.chunks(SOCKET_CHUNK_BYTES) {
            self.stream
                .write_all(chunk)
                .await
                .map_err(|e| bench_io("writing", e))?;
        }
        let mut ack = [0u8; 1];
        self.stream
            .read_exact(&mut ack)
            .await
            .map_err(|e| bench_io("reading the ack", e))?;
        Ok(started.elapsed())
    }

    async fn close(self) -> Result<(), TransferError> {
        drop(self.stream);
        match self.reader.await {
            Ok(result) => result.map_err(|e| bench_io("loopback reader", e)),
            Err(error) => Err(bench_io("loopback reader", std::io::Error::other(error))),
        }
    }
}

/// One whole transfer, timed from connecting until the receiver holds every verified layer.
async fn time_transfer<T: KvTransport>(
    transport: &T,
    receiver: &KvReceiver,
    layers: &[Bytes],
    num_blocks: usize,
    round: usize,
) -> Result<Duration, TransferError> {
    let request_id = format!("bench-{round}");
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
    let pending = receiver.expect(expected, Duration::from_secs(60))?;
    let started = Instant::now();
    let (sent, received) = tokio::join!(
        send_all(
            transport,
            receiver.endpoint(),
            header,
            layers.to_vec(),
            Some(0)
        ),
        pending.wait()
    );
    let elapsed = started.elapsed();
    sent?;
    // As a decode worker does once the KV is in its engine: the buffers serve the next transfer.
    receiver.recycle(received?);
    Ok(elapsed)
}
