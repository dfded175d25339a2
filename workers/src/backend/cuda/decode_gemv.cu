// Decode projections of steps of up to eight tokens (the decode graph buckets 1, 2, 4 and 8), as GEMVs that carry
// the work around them, so that with the fused attention a layer is five launches instead of ten:
//   qkv      = RMSNorm(hidden) · Wqkvᵀ                     (decode_gemv_norm_store_t*)
//   hidden  += attention · Woᵀ                             (decode_gemv_add_t*)
//   act      = SwiGLU(RMSNorm(hidden) · Wgate_upᵀ)        (decode_gemv_norm_swiglu_t*)
//   hidden  += act · Wdownᵀ                                (decode_gemv_add_t*)
//   logits   = RMSNorm(hidden) · Wlm_headᵀ, and argmax     (decode_gemv_norm_argmax_t*)
// Two kinds: FMA GEMVs for one or two tokens (decode_gemv below; the backend takes them at one) and
// tensor-core ones for 1, 2, 4 or 8 (decode_gemv_mma, at the end; the backend takes them from two to eight).
// At one token a projection reads each weight once, so it is bound by how many weight bytes are in flight:
// each FMA warp owns two or four output rows and keeps 16 to 24 16-byte loads in flight per lane, and the grid is
// one resident wave, so the fixed cost of a block (its prologue) is paid once per multiprocessor slot. The block's
// input (normalized here when the GEMV starts with the RMSNorm, every block recomputing it: a few KB from L2)
// sits in shared memory in bf16, the precision the cuBLAS path feeds its GEMMs, so both paths round alike.
//
// Programmatic dependent launch (sm_90): every kernel of the fast decode path lets the next one launch at its
// start; the next one loads its first weight chunks (they depend on nothing) and then waits
// (griddepcontrol.wait) for this one to finish before it reads anything this one writes. A kernel launched without the attribute returns from
// the wait at once, so the same code runs in every path.

#define GEMV_WARPS 4
#define GEMV_THREADS (GEMV_WARPS * 32)
#define GEMV_MAX_TOKENS 2

enum GemvEpilogue { GEMV_STORE = 0, GEMV_ADD = 1, GEMV_SWIGLU = 2, GEMV_ARGMAX = 3 };

__device__ __forceinline__ float dot8_bf16(uint4 w, uint4 x) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {x.x, x.y, x.z, x.w};
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        sum = fmaf(__uint_as_float(ws[i] << 16), __uint_as_float(xs[i] << 16), sum);
        sum = fmaf(__uint_as_float(ws[i] & 0xffff0000u), __uint_as_float(xs[i] & 0xffff0000u), sum);
    }
    return sum;
}

// A key whose unsigned order is the order of (value, then lower index first); NaN never wins.
__device__ __forceinline__ unsigned long long argmax_key(float value, unsigned index) {
    const unsigned bits = __float_as_uint(value);
    unsigned ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    if ((bits & 0x7fffffffu) > 0x7f800000u) ordered = 0;
    return ((unsigned long long)ordered << 32) | (unsigned long long)(0xffffffffu - index);
}

// Loads this lane's chunks first..first + 32 * (CHUNKS - 1) of the warp's rows (those inside the row).
template <int ROWS, int CHUNKS>
__device__ __forceinline__ void load_rows(const uint4* const (&rows)[ROWS], int first, int chunks,
                                          uint4 (&loaded)[ROWS][CHUNKS]) {
#pragma unroll
    for (int u = 0; u < CHUNKS; ++u) {
        const int c = first + 32 * u;
        if (c < chunks) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) loaded[r][u] = __ldg(rows[r] + c);
        }
    }
}

// The norm weights of this thread's first NORM_KEPT quads (all of them up to a hidden size of 1024): they do
// not depend on the previous kernel, so a GEMV loads them before its wait.
#define NORM_KEPT 2
__device__ __forceinline__ void load_kept_norm_weights(const float* norm_weight, int k,
                                                       float4 (&kept_weight)[NORM_KEPT]) {
    const float4* weight = reinterpret_cast<const float4*>(norm_weight);
#pragma unroll
    for (int j = 0; j < NORM_KEPT; ++j) {
        const int i = threadIdx.x + j * GEMV_THREADS;
        if (i < (k >> 2)) kept_weight[j] = __ldg(weight + i);
    }
}

// Puts a GEMV block's input for T tokens in shared memory as bf16 [T][k]: RMSNorm(hidden) with NORM (every
// block recomputing it: a few KB from L2; the first NORM_KEPT quads of each thread stay in registers between
// the sum of squares and the scaling), else the bf16 activation x_bf16 as it is. Ends with a block barrier.
// For blocks of GEMV_THREADS threads.
template <int T, bool NORM>
__device__ __forceinline__ void stage_gemv_input(bf16_t* x_shared, int k, const float* hidden,
                                                 const float* norm_weight, const float4 (&kept_weight)[NORM_KEPT],
                                                 float eps, const bf16_t* x_bf16) {
    if (NORM) {
        const int quads = k >> 2, threads = GEMV_THREADS;
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const float4* weight = reinterpret_cast<const float4*>(norm_weight);
        auto store_normed = [&](int t, int i, float4 v, float4 g, float scale) {
            bf16_t* target = x_shared + t * k + 4 * i;
            target[0] = f2bf(g.x * (v.x * scale));
            target[1] = f2bf(g.y * (v.y * scale));
            target[2] = f2bf(g.z * (v.z * scale));
            target[3] = f2bf(g.w * (v.w * scale));
        };
        auto squares = [](float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; };
        // Every token's kept quads are requested before any is summed, and all the tokens' sums share one
        // block reduction, so a step of T tokens waits for L2 and the barrier once, not T times.
        float4 kept[T][NORM_KEPT];
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4* x = reinterpret_cast<const float4*>(hidden + (size_t)t * k);
#pragma unroll
            for (int j = 0; j < NORM_KEPT; ++j) {
                const int i = threadIdx.x + j * threads;
                if (i < quads) kept[t][j] = x[i];
            }
        }
        __shared__ float warp_sums[T][GEMV_WARPS];
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4* x = reinterpret_cast<const float4*>(hidden + (size_t)t * k);
            float sum_squares = 0.0f;
#pragma unroll
            for (int j = 0; j < NORM_KEPT; ++j)
                if (threadIdx.x + j * threads < quads) sum_squares += squares(kept[t][j]);
            for (int i = threadIdx.x + NORM_KEPT * threads; i < quads; i += threads) sum_squares += squares(x[i]);
            sum_squares = warp_sum(sum_squares);
            if (lane == 0) warp_sums[t][warp] = sum_squares;
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4* x = reinterpret_cast<const float4*>(hidden + (size_t)t * k);
            float sum_squares = 0.0f;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; ++w) sum_squares += warp_sums[t][w];
            const float scale = 1.0f / sqrtf(sum_squares / k + eps);
#pragma unroll
            for (int j = 0; j < NORM_KEPT; ++j) {
                const int i = threadIdx.x + j * threads;
                if (i < quads) store_normed(t, i, kept[t][j], kept_weight[j], scale);
            }
            for (int i = threadIdx.x + NORM_KEPT * threads; i < quads; i += threads)
                store_normed(t, i, x[i], weight[i], scale);
        }
    } else {
        // Copied by cp.async, so every 16 bytes of a thread are in flight at once: a plain copy loop waited
        // for L2 once per 16 bytes a thread (a store cannot pass its load), a round trip per 2 KB of input.
        const uint4* source = reinterpret_cast<const uint4*>(x_bf16);
        uint4* target = reinterpret_cast<uint4*>(x_shared);
        for (int i = threadIdx.x; i < T * (k >> 3); i += GEMV_THREADS) copy_16_async(target + i, source + i, 16);
        copies_commit();
        copies_wait<0>();
    }
    __syncthreads();
}

// One warp owns PAIRS output pairs at a time (a pair: rows 2p and 2p + 1, or for the SwiGLU gate row p and up
// row p + n, gate_up being [gate; up]), and keeps CHUNKS 16-byte loads of each of their rows in flight per lane.
// Warps walk the pairs grid-stride; the launch sizes the grid to one resident wave, so each block normalizes
// its input once.
template <int T, int EPILOGUE, bool NORM, int PAIRS, int CHUNKS>
__device__ __forceinline__ void decode_gemv(const bf16_t* w, int k, int n, const float* hidden,
                                            const float* norm_weight, float eps, const bf16_t* x_bf16,
                                            float* out_f32, bf16_t* out_bf16, unsigned long long* argmax_keys) {
    constexpr int ROWS = 2 * PAIRS;
    extern __shared__ __align__(16) bf16_t x_shared[];  // [T][k]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int pairs = EPILOGUE == GEMV_SWIGLU ? n : (n + 1) / 2;
    const int groups = (pairs + PAIRS - 1) / PAIRS;  // a warp's unit of work: PAIRS consecutive pairs
    const int chunks = k >> 3;                        // 16-byte chunks per row; k % 8 == 0 (checked by the host)
    const int warp_stride = gridDim.x * GEMV_WARPS;

    // Row r of a group: pair (group * PAIRS + r / 2), its first or second row; rows past the matrix read
    // the last valid row and are not stored.
    auto row_of = [&](int group, int r) {
        const int pair = min(group * PAIRS + r / 2, pairs - 1);
        if (EPILOGUE == GEMV_SWIGLU) return r % 2 == 0 ? pair : pair + n;
        return min(2 * pair + r % 2, n - 1);
    };

    allow_next_grid();
    // The weights do not depend on the previous kernel: the first chunks of this warp's first rows are
    // loaded before the wait and the prologue, so their latency overlaps both; the rest of those rows is
    // prefetched into L2.
    const int first_group = blockIdx.x * GEMV_WARPS + warp;
    uint4 loaded[ROWS][CHUNKS];
    const uint4* rows[ROWS];
    if (first_group < groups) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) rows[r] = reinterpret_cast<const uint4*>(w + (size_t)row_of(first_group, r) * k);
        load_rows<ROWS, CHUNKS>(rows, lane, chunks, loaded);
        const int preloaded = 32 * CHUNKS;
        if (chunks > preloaded) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (lane == r) prefetch_l2(rows[r] + preloaded, (unsigned)(chunks - preloaded) * 16);
        }
    }
    float4 kept_weight[NORM_KEPT];
    if (NORM) load_kept_norm_weights(norm_weight, k, kept_weight);
    wait_for_previous_grid();

    // The residual's current value of the first group's rows, read now rather than after the products.
    float residual[ROWS][T];
    if (EPILOGUE == GEMV_ADD && lane == 0 && first_group < groups) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int t = 0; t < T; ++t) residual[r][t] = out_f32[(size_t)t * n + row_of(first_group, r)];
        }
    }
    stage_gemv_input<T, NORM>(x_shared, k, hidden, norm_weight, kept_weight, eps, x_bf16);

    unsigned long long best[T];
#pragma unroll
    for (int t = 0; t < T; ++t) best[t] = 0;
    const uint4* x_chunks = reinterpret_cast<const uint4*>(x_shared);
    for (int group = first_group; group < groups; group += warp_stride) {
        float acc[ROWS][T];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = 0.0f;
        }
        if (group != first_group) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) rows[r] = reinterpret_cast<const uint4*>(w + (size_t)row_of(group, r) * k);
        }
        for (int first = lane; first < chunks; first += 32 * CHUNKS) {
            if (group != first_group || first != lane) load_rows<ROWS, CHUNKS>(rows, first, chunks, loaded);
#pragma unroll
            for (int u = 0; u < CHUNKS; ++u) {
                const int c = first + 32 * u;
                if (c < chunks) {
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        const uint4 x = x_chunks[t * chunks + c];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) acc[r][t] += dot8_bf16(loaded[r][u], x);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = warp_sum(acc[r][t]);
        }
        if (lane != 0) continue;
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            const int pair = group * PAIRS + p;
            if (pair >= pairs) break;
            const int row0 = EPILOGUE == GEMV_SWIGLU ? pair : 2 * pair;
            const int row1 = EPILOGUE == GEMV_SWIGLU ? pair + n : 2 * pair + 1;
            const bool has_row1 = EPILOGUE == GEMV_SWIGLU || row1 < n;
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float first_value = acc[2 * p][t], second_value = acc[2 * p + 1][t];
                if (EPILOGUE == GEMV_STORE || EPILOGUE == GEMV_ARGMAX) {
                    out_f32[(size_t)t * n + row0] = first_value;
                    if (has_row1) out_f32[(size_t)t * n + row1] = second_value;
                } else if (EPILOGUE == GEMV_ADD) {
                    // The first group's residual was read at the wait; a later group's is read now.
                    const bool residual_read = group == first_group;
                    const float old0 = residual_read ? residual[2 * p][t] : out_f32[(size_t)t * n + row0];
                    out_f32[(size_t)t * n + row0] = old0 + first_value;
                    if (has_row1) {
                        const float old1 = residual_read ? residual[2 * p + 1][t] : out_f32[(size_t)t * n + row1];
                        out_f32[(size_t)t * n + row1] = old1 + second_value;
                    }
                } else {
                    out_bf16[(size_t)t * n + pair] = f2bf(first_value / (1.0f + expf(-first_value)) * second_value);
                }
                if (EPILOGUE == GEMV_ARGMAX) {
                    unsigned long long key = argmax_key(first_value, row0);
                    if (has_row1) {
                        const unsigned long long other = argmax_key(second_value, row1);
                        if (other > key) key = other;
                    }
                    if (key > best[t]) best[t] = key;
                }
            }
        }
    }
    if (EPILOGUE == GEMV_ARGMAX) {
        __shared__ unsigned long long block_best[GEMV_MAX_TOKENS][GEMV_WARPS];
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < T; ++t) block_best[t][warp] = best[t];
        }
        __syncthreads();
        if (threadIdx.x < T) {
            unsigned long long key = 0;
            for (int other = 0; other < GEMV_WARPS; ++other)
                if (block_best[threadIdx.x][other] > key) key = block_best[threadIdx.x][other];
            if (key != 0) atomicMax(&argmax_keys[threadIdx.x], key);
        }
    }
}

// Projections from the hidden size (qkv, gate_up, lm_head: k of 1024-4096) take two pairs a warp, 4 chunks
// of each row in flight; those from the wider attention output or intermediate (o_proj, down) one pair, 12
// (all of a 3072-wide row).
#define DECODE_GEMV_ENTRY(name, T, EPILOGUE, NORM)                                                              \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                                  \
        name(const bf16_t* w, int k, int n, const float* hidden, const float* norm_weight, float eps,           \
             const bf16_t* x_bf16, float* out_f32, bf16_t* out_bf16, unsigned long long* argmax_keys) {         \
        decode_gemv<T, EPILOGUE, NORM, NORM ? 2 : 1, NORM ? 4 : 12>(w, k, n, hidden, norm_weight, eps, x_bf16,  \
                                                                   out_f32, out_bf16, argmax_keys);            \
    }

DECODE_GEMV_ENTRY(decode_gemv_norm_store_t1, 1, GEMV_STORE, true)
DECODE_GEMV_ENTRY(decode_gemv_norm_store_t2, 2, GEMV_STORE, true)
DECODE_GEMV_ENTRY(decode_gemv_add_t1, 1, GEMV_ADD, false)
DECODE_GEMV_ENTRY(decode_gemv_add_t2, 2, GEMV_ADD, false)
DECODE_GEMV_ENTRY(decode_gemv_norm_swiglu_t1, 1, GEMV_SWIGLU, true)
DECODE_GEMV_ENTRY(decode_gemv_norm_swiglu_t2, 2, GEMV_SWIGLU, true)
DECODE_GEMV_ENTRY(decode_gemv_norm_argmax_t1, 1, GEMV_ARGMAX, true)
DECODE_GEMV_ENTRY(decode_gemv_norm_argmax_t2, 2, GEMV_ARGMAX, true)

// The same projections for steps of up to eight tokens on the tensor cores (mma.sync m16n8k16, bf16 in, f32
// accumulators), where the FMA GEMVs above would multiply their unpacking and adds by the tokens. The tokens
// are the mma's rows (A, up to eight of its sixteen used) and a tile of eight output rows its columns (B), so a
// warp's weight loads stay 16 bytes a lane: since a dot product may sum its k in any order, lane (g, c) takes
// chunk 4j + c of 32-wide k block j for both its weight row g and its token g, and feeds the chunk's four words
// to the slots the layout gives lane c in two mma steps. A block's four warps split k (k block j goes to warp
// j % 4, KB blocks a warp in flight) and reduce their partial tiles through shared memory; blocks walk the
// tiles grid-stride, and each loads its first tile's weights before the wait. For the SwiGLU a tile is four
// units, rows ordered gate, up, gate, up..., so each lane ends with a unit's gate and up values.
#define MMA_GEMV_WARPS GEMV_WARPS  // stage_gemv_input takes blocks of GEMV_THREADS
#define MMA_GEMV_MAX_TOKENS 8
#define MMA_CHAINS 4  // independent accumulators a warp alternates between

template <int T, int EPILOGUE, bool NORM, int KB>
__device__ __forceinline__ void decode_gemv_mma(const bf16_t* w, int k, int n, const float* hidden,
                                                const float* norm_weight, float eps, const bf16_t* x_bf16,
                                                float* out_f32, bf16_t* out_bf16,
                                                unsigned long long* argmax_keys) {
    extern __shared__ __align__(16) bf16_t x_shared[];  // [T][k]
    __shared__ float partial_tile[MMA_GEMV_WARPS][32][2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int kblocks = k >> 5;  // k % 32 == 0 (checked by the host)
    const int chunks = k >> 3;
    const int units_per_tile = EPILOGUE == GEMV_SWIGLU ? 4 : 8;
    const int tiles = (n + units_per_tile - 1) / units_per_tile;
    // The weight row lane group g reads in `tile` (rows past the matrix read its last row, never stored).
    auto weight_row = [&](int tile) -> const uint4* {
        int row;
        if (EPILOGUE == GEMV_SWIGLU) {
            const int unit = min(tile * 4 + (g >> 1), n - 1);
            row = (g & 1) ? unit + n : unit;
        } else {
            row = min(tile * 8 + g, n - 1);
        }
        return reinterpret_cast<const uint4*>(w + (size_t)row * k);
    };
    // This warp's k blocks of one pass: pass p, slot u is k block 4 * (p * KB + u) + warp.
    auto load_pass = [&](const uint4* row, int pass, uint4 (&loaded)[KB]) {
#pragma unroll
        for (int u = 0; u < KB; ++u) {
            const int block = MMA_GEMV_WARPS * (pass * KB + u) + warp;
            if (block < kblocks) loaded[u] = __ldg(row + 4 * block + c);
        }
    };

    allow_next_grid();
    const int first_tile = blockIdx.x;
    uint4 loaded[KB];
    if (first_tile < tiles) load_pass(weight_row(first_tile), 0, loaded);
    float4 kept_weight[NORM_KEPT];
    if (NORM) load_kept_norm_weights(norm_weight, k, kept_weight);
    wait_for_previous_grid();
    // The residual's current value of the first tile's rows, read while the input is staged rather than after
    // the products.
    const int first_row = first_tile * 8 + 2 * c;
    float residual[2] = {0.0f, 0.0f};
    if (EPILOGUE == GEMV_ADD && warp == 0 && g < T) {
        if (first_row < n) residual[0] = out_f32[(size_t)g * n + first_row];
        if (first_row + 1 < n) residual[1] = out_f32[(size_t)g * n + first_row + 1];
    }
    stage_gemv_input<T, NORM>(x_shared, k, hidden, norm_weight, kept_weight, eps, x_bf16);

    const uint4* x_chunks = reinterpret_cast<const uint4*>(x_shared);
    const int passes = (kblocks + MMA_GEMV_WARPS * KB - 1) / (MMA_GEMV_WARPS * KB);
    unsigned long long best = 0;  // warp 0, lanes of tokens g < T: the best (logit, row) key so far
    for (int tile = first_tile; tile < tiles; tile += gridDim.x) {
        const uint4* row = weight_row(tile);
        // MMA_CHAINS accumulators, so that consecutive mma steps do not wait for each other's results.
        float acc[MMA_CHAINS][4];
#pragma unroll
        for (int chain = 0; chain < MMA_CHAINS; ++chain)
            acc[chain][0] = acc[chain][1] = acc[chain][2] = acc[chain][3] = 0.0f;
        for (int pass = 0; pass < passes; ++pass) {
            if (tile != first_tile || pass != 0) load_pass(row, pass, loaded);
#pragma unroll
            for (int u = 0; u < KB; ++u) {
                const int block = MMA_GEMV_WARPS * (pass * KB + u) + warp;
                if (block < kblocks) {
                    const uint4 x = g < T ? x_chunks[g * chunks + 4 * block + c] : make_uint4(0, 0, 0, 0);
                    const unsigned a_first[4] = {x.x, 0u, x.y, 0u}, b_first[2] = {loaded[u].x, loaded[u].y};
                    const unsigned a_second[4] = {x.z, 0u, x.w, 0u}, b_second[2] = {loaded[u].z, loaded[u].w};
                    mma_bf16_16816(acc[(2 * u) % MMA_CHAINS], a_first, b_first);
                    mma_bf16_16816(acc[(2 * u + 1) % MMA_CHAINS], a_second, b_second);
                }
            }
        }
        // acc[.][0], acc[.][1]: token g, tile rows 2c and 2c + 1 ([2], [3] belong to the unused rows 8-15).
        float first_sum = 0.0f, second_sum = 0.0f;
#pragma unroll
        for (int chain = 0; chain < MMA_CHAINS; ++chain) {
            first_sum += acc[chain][0];
            second_sum += acc[chain][1];
        }
        partial_tile[warp][lane][0] = first_sum;
        partial_tile[warp][lane][1] = second_sum;
        __syncthreads();
        if (warp == 0 && g < T) {
            float first_value = 0.0f, second_value = 0.0f;
#pragma unroll
            for (int other = 0; other < MMA_GEMV_WARPS; ++other) {
                first_value += partial_tile[other][lane][0];
                second_value += partial_tile[other][lane][1];
            }
            if (EPILOGUE == GEMV_SWIGLU) {
                const int unit = tile * 4 + c;
                if (unit < n)
                    out_bf16[(size_t)g * n + unit] =
                        f2bf(first_value / (1.0f + expf(-first_value)) * second_value);
            } else {
                const int row0 = tile * 8 + 2 * c, row1 = row0 + 1;
                float* out_row = out_f32 + (size_t)g * n;
                if (EPILOGUE == GEMV_ADD) {
                    const bool residual_read = tile == first_tile;
                    if (row0 < n) out_row[row0] = (residual_read ? residual[0] : out_row[row0]) + first_value;
                    if (row1 < n) out_row[row1] = (residual_read ? residual[1] : out_row[row1]) + second_value;
                } else {
                    if (row0 < n) out_row[row0] = first_value;
                    if (row1 < n) out_row[row1] = second_value;
                }
                if (EPILOGUE == GEMV_ARGMAX) {
                    if (row0 < n) {
                        const unsigned long long key = argmax_key(first_value, row0);
                        if (key > best) best = key;
                    }
                    if (row1 < n) {
                        const unsigned long long key = argmax_key(second_value, row1);
                        if (key > best) best = key;
                    }
                }
            }
        }
        __syncthreads();  // partial_tile is free for the next tile
    }
    if (EPILOGUE == GEMV_ARGMAX && warp == 0) {
        // The four lanes of token g hold its tile rows 2c, 2c + 1: reduce over c, then one atomic per token.
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, offset);
            if (other > best) best = other;
        }
        if (g < T && c == 0 && best != 0) atomicMax(&argmax_keys[g], best);
    }
}

// Weights of a warp in flight: 16 bytes a k block; NORM kernels read the hidden size (KB 8: 1024 in one pass),
// the others the attention output or the intermediate (KB 24: 3072 in one pass).
#define DECODE_GEMV_MMA_ENTRY(name, T, EPILOGUE, NORM)                                                          \
    extern "C" __global__ void __launch_bounds__(MMA_GEMV_WARPS * 32)                                           \
        name(const bf16_t* w, int k, int n, const float* hidden, const float* norm_weight, float eps,           \
             const bf16_t* x_bf16, float* out_f32, bf16_t* out_bf16, unsigned long long* argmax_keys) {         \
        decode_gemv_mma<T, EPILOGUE, NORM, NORM ? 8 : 24>(w, k, n, hidden, norm_weight, eps, x_bf16, out_f32,   \
                                                         out_bf16, argmax_keys);                               \
    }

#define DECODE_GEMV_MMA_TOKENS(T)                                                                               \
    DECODE_GEMV_MMA_ENTRY(decode_gemv_mma_norm_store_t##T, T, GEMV_STORE, true)                                 \
    DECODE_GEMV_MMA_ENTRY(decode_gemv_mma_add_t##T, T, GEMV_ADD, false)                                         \
    DECODE_GEMV_MMA_ENTRY(decode_gemv_mma_norm_swiglu_t##T, T, GEMV_SWIGLU, true)                               \
    DECODE_GEMV_MMA_ENTRY(decode_gemv_mma_norm_argmax_t##T, T, GEMV_ARGMAX, true)

DECODE_GEMV_MMA_TOKENS(1)
DECODE_GEMV_MMA_TOKENS(2)
DECODE_GEMV_MMA_TOKENS(4)
DECODE_GEMV_MMA_TOKENS(8)
