//! The CPU backend's numeric kernels: matrix products against `nn.Linear`-shaped weights, dot products,
//! RMSNorm, RoPE and the SwiGLU activation, all in f32.

use rayon::prelude::*;

/// Batches up to this many rows read each weight row once for all of them (a GEMV-like kernel); the weight
/// stream dominates at small batch, and a packing GEMM would copy the whole weight matrix on every call.
const SMALL_BATCH_ROWS: usize = 32;
/// Input rows per register tile of the streaming kernel.
const TILE_ROWS: usize = 8;

/// `out[m, n] = a[m, k] · w[n, k]ᵀ`, where `w` is row-major `[out_features, in_features]` like `nn.Linear`.
/// `scratch` is reused across calls to avoid per-step allocation.
pub(crate) fn matmul_transposed(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(out.len(), m * n);
    if m == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if m == 1 {
        let rows_per_task = (n / (threads * 8)).max(64);
        out.par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(task, out_chunk)| {
                let first_row = task * rows_per_task;
                for (j, value) in out_chunk.iter_mut().enumerate() {
                    let row = first_row + j;
                    *value = dot(a, &w[row * k..(row + 1) * k]);
                }
            });
    } else if m <= SMALL_BATCH_ROWS {
        // Computed as [n, m] so each task owns a contiguous range of weight rows, then transposed.
        scratch.clear();
        scratch.resize(n * m, 0.0);
        let rows_per_task = (n / (threads * 8)).max(64);
        scratch
            .par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first_row = task * rows_per_task;
                let w_rows = &w[first_row * k..(first_row + chunk.len() / m) * k];
                rows_against_inputs(a, k, m, w_rows, chunk);
            });
        for (j, values) in scratch.chunks_exact(m).enumerate() {
            for (i, &value) in values.iter().enumerate() {
                out[i * n + j] = value;
            }
        }
    } else if n >= m * threads * 4 {
        // Few rows against a wide weight (lm_head at a large batch): each task multiplies all rows by its own
        // slice of weight rows, so every weight element is packed once per call, not once per task.
        let columns_per_task = n.div_ceil(threads * 4);
        scratch.clear();
        scratch.resize(m * n, 0.0);
        scratch
            .par_chunks_mut(m * columns_per_task)
            .enumerate()
            .for_each(|(task, block)| {
                let columns = block.len() / m;
                let w_rows = &w[task * columns_per_task * k..][..columns * k];
                sgemm_transposed(a, m, k, w_rows, columns, block);
            });
        for (task, block) in scratch.chunks(m * columns_per_task).enumerate() {
            let columns = block.len() / m;
            for (i, row) in block.chunks_exact(columns).enumerate() {
                out[i * n + task * columns_per_task..][..columns].copy_from_slice(row);
            }
        }
    } else {
        let rows_per_task = m.div_ceil(threads);
        out.par_chunks_mut(rows_per_task * n)
            .zip(a.par_chunks(rows_per_task * k))
            .for_each(|(out_rows, a_rows)| {
                sgemm_transposed(a_rows, a_rows.len() / k, k, w, n, out_rows)
            });
    }
}

/// `out[m, n] = a[m, k] · w[n, k]ᵀ` on one thread, through matrixmultiply's packed GEMM.
fn sgemm_transposed(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(a.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    // SAFETY: the pointers and strides describe `a` [m, k] (row-major), `w` viewed as [k, n] with row
    // stride 1 and column stride k (its transpose), and `out` [m, n] (row-major); the assert above checks
    // that all three slices are at least that long, and `out` is borrowed mutably, so exclusively ours.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `dot_avx2_fma` is compiled for (checked just above).
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes let the compiler vectorize without reassociating a single sum.
    let mut lanes = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let len = a.len().min(b.len());
    let blocks = len / 32 * 32;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < blocks {
        for (lane, accumulator) in acc.iter_mut().enumerate() {
            let offset = i + lane * 8;
            // SAFETY: offset + 8 <= blocks <= len, so both loads are in bounds.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(offset)),
                    _mm256_loadu_ps(pb.add(offset)),
                )
            };
            *accumulator = _mm256_fmadd_ps(x, y, *accumulator);
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds exactly 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let tail: f32 = a[blocks..len]
        .iter()
        .zip(&b[blocks..len])
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// `out[j * R + i] = dot(a_i, w_j)` for the `R` input rows of `a` and every row of `w_rows`: the weights
/// stream through once, in order, each loaded weight vector feeding `R` multiply-adds.
fn rows_against_inputs(a: &[f32], k: usize, m: usize, w_rows: &[f32], out: &mut [f32]) {
    let full_tiles = m / TILE_ROWS;
    let tile_inputs: Vec<[&[f32]; TILE_ROWS]> = (0..full_tiles)
        .map(|tile| std::array::from_fn(|r| &a[(tile * TILE_ROWS + r) * k..][..k]))
        .collect();
    let rest = full_tiles * TILE_ROWS;
    for (w_row, values) in w_rows.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        // The weight row stays in L1 across tiles, so it is read from memory once.
        for (tile, inputs) in tile_inputs.iter().enumerate() {
            values[tile * TILE_ROWS..][..TILE_ROWS].copy_from_slice(&dot_1xr(w_row, *inputs));
        }
        let rest_values = &mut values[rest..];
        let input = |r: usize| &a[(rest + r) * k..][..k];
        match m - rest {
            0 => {}
            1 => rest_values[0] = dot(w_row, input(0)),
            2 => rest_values.copy_from_slice(&dot_1xr::<2>(w_row, std::array::from_fn(input))),
            3 => rest_values.copy_from_slice(&dot_1xr::<3>(w_row, std::array::from_fn(input))),
            4 => rest_values.copy_from_slice(&dot_1xr::<4>(w_row, std::array::from_fn(input))),
            5 => rest_values.copy_from_slice(&dot_1xr::<5>(w_row, std::array::from_fn(input))),
            6 => rest_values.copy_from_slice(&dot_1xr::<6>(w_row, std::array::from_fn(input))),
            _ => rest_values.copy_from_slice(&dot_1xr::<7>(w_row, std::array::from_fn(input))),
        }
    }
}

/// The dot products of one weight row with `R` input rows.
fn dot_1xr<const R: usize>(w_row: &[f32], a: [&[f32]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `dot_1xr_avx2_fma` is compiled for.
            return unsafe { dot_1xr_avx2_fma(w_row, a) };
        }
    }
    a.map(|a_row| dot_portable(a_row, w_row))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_1xr_avx2_fma<const R: usize>(w_row: &[f32], a: [&[f32]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let len = w_row.len();
    assert!(a.iter().all(|row| row.len() == len));
    let blocks = len / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offset = 0;
    while offset < blocks {
        // SAFETY: offset + 8 <= blocks <= len, the length of every row (asserted above).
        unsafe {
            let x = _mm256_loadu_ps(w_row.as_ptr().add(offset));
            for r in 0..R {
                let y = _mm256_loadu_ps(a[r].as_ptr().add(offset));
                acc[r] = _mm256_fmadd_ps(x, y, acc[r]);
            }
        }
        offset += 8;
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds exactly 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        let tail: f32 = w_row[blocks..]
            .iter()
            .zip(&a[r][blocks..])
            .map(|(x, y)| x * y)
            .sum();
        out[r] = lanes.iter().sum::<f32>() + tail;
    }
    out
}

/// `out = x / rms(x) * weight`, as Qwen3RMSNorm computes it in f32.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = dot(x, x) / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * scale);
    }
}

/// RMSNorm in place (used per head for q_norm / k_norm).
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_square = dot(x, x) / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = w * (*v * scale);
    }
}

/// The RoPE frequencies `1 / theta^(2i / head_dim)`, computed in f32 as transformers does.
pub(crate) fn rope_inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Fills `cos`/`sin` (each `head_dim / 2`) for one position.
pub(crate) fn rope_angles(
    position: usize,
    inverse_frequencies: &[f32],
    cos: &mut [f32],
    sin: &mut [f32],
) {
    for ((&frequency, c), s) in inverse_frequencies
        .iter()
        .zip(cos.iter_mut())
        .zip(sin.iter_mut())
    {
        let angle = position as f32 * frequency;
        *c = angle.cos();
        *s = angle.sin();
    }
}

/// Rotates one head in place, "rotate half" style: dimension `i` pairs with `i + head_dim / 2`.
pub(crate) fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (first, second) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (first[i], second[i]);
        first[i] = x1 * cos[i] - x2 * sin[i];
        second[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// SwiGLU: `out = silu(gate) * up`.
pub(crate) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn every_matmul_path_matches_a_naive_product() {
        let k = 37;
        let mut scratch = Vec::new();
        // Streaming (m <= 32, with and without a remainder tile), weight-split GEMM (wide n), row-split GEMM.
        for (m, n) in [
            (1, 301),
            (2, 301),
            (3, 301),
            (5, 301),
            (8, 301),
            (9, 301),
            (20, 301),
            (31, 301),
        ]
        .into_iter()
        .chain([(40, 2000), (33, 3001), (40, 301), (70, 301)])
        {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 23) as f32 / 23.0 - 0.5)
                .collect();
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104_729) % 17) as f32 / 17.0 - 0.5)
                .collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_transposed(&a, m, k, &w, n, &mut out, &mut scratch);
            for (x, y) in out.iter().zip(naive(&a, m, k, &w, n)) {
                assert!((x - y).abs() < 1e-4, "m={m} n={n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn dot_paths_agree() {
        let a: Vec<f32> = (0..77).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..77).map(|i| 1.0 - i as f32 * 0.01).collect();
        let expected: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - expected).abs() < 1e-3);
        assert!((dot_portable(&a, &b) - expected).abs() < 1e-3);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let frequencies = rope_inverse_frequencies(8, 10_000.0);
        let (mut cos, mut sin) = (vec![0.0; 4], vec![0.0; 4]);
        let original: Vec<f32> = (0..8).map(|i| i as f32 - 3.0).collect();
        let mut head = original.clone();
        rope_angles(0, &frequencies, &mut cos, &mut sin);
        apply_rope(&mut head, &cos, &sin);
        assert_eq!(head, original);
        rope_angles(17, &frequencies, &mut cos, &mut sin);
        apply_rope(&mut head, &cos, &sin);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&head) - norm(&original)).abs() < 1e-3);
        assert_ne!(head, original);
    }
}
