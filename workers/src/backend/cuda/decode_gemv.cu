// Decode projections of steps of one or two tokens (the decode graph buckets 1 and 2), as
// GEMVs that carry the work around them, so a layer is six launches instead of ten:
//   qkv      = RMSNorm(hidden) · Wqkvᵀ                     (decode_gemv_norm_store_t*)
//   hidden  += attention · Woᵀ                             (decode_gemv_add_t*)
//   act      = SwiGLU(RMSNorm(hidden) · Wgate_upᵀ)        (decode_gemv_norm_swiglu_t*)
//   hidden  += act · Wdownᵀ                                (decode_gemv_add_t*)
//   logits   = RMSNorm(hidden) · Wlm_headᵀ, and argmax     (decode_gemv_norm_argmax_t*)
// At one token a projection reads each weight once, so it is bound by how many weight bytes are in flight:
// each warp owns two or four output rows and keeps 16 to 24 16-byte loads in flight per lane, and the grid is one
// resident wave, so the fixed cost of a block (its prologue) is paid once per multiprocessor slot. The block's
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
    // The norm weights of this thread's first NORM_KEPT quads (all of them up to a hidden size of 1024) do not
    // depend on the previous kernel either; those quads of the hidden state stay in registers between the
    // sum of squares and the scaling.
    constexpr int NORM_KEPT = 2;
    const int quads = k >> 2;
    const float4* weight = reinterpret_cast<const float4*>(norm_weight);
    float4 kept_weight[NORM_KEPT];
    if (NORM) {
#pragma unroll
        for (int j = 0; j < NORM_KEPT; ++j) {
            const int i = threadIdx.x + j * GEMV_THREADS;
            if (i < quads) kept_weight[j] = __ldg(weight + i);
        }
    }
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

    if (NORM) {
        auto store_normed = [&](int t, int i, float4 v, float4 g, float scale) {
            bf16_t* target = x_shared + t * k + 4 * i;
            target[0] = f2bf(g.x * (v.x * scale));
            target[1] = f2bf(g.y * (v.y * scale));
            target[2] = f2bf(g.z * (v.z * scale));
            target[3] = f2bf(g.w * (v.w * scale));
        };
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4* x = reinterpret_cast<const float4*>(hidden + (size_t)t * k);
            float4 kept[NORM_KEPT];
            float sum_squares = 0.0f;
#pragma unroll
            for (int j = 0; j < NORM_KEPT; ++j) {
                const int i = threadIdx.x + j * GEMV_THREADS;
                if (i < quads) {
                    kept[j] = x[i];
                    sum_squares += kept[j].x * kept[j].x + kept[j].y * kept[j].y + kept[j].z * kept[j].z +
                                   kept[j].w * kept[j].w;
                }
            }
            for (int i = threadIdx.x + NORM_KEPT * GEMV_THREADS; i < quads; i += GEMV_THREADS) {
                const float4 v = x[i];
                sum_squares += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            const float scale = 1.0f / sqrtf(block_sum(sum_squares) / k + eps);
#pragma unroll
            for (int j = 0; j < NORM_KEPT; ++j) {
                const int i = threadIdx.x + j * GEMV_THREADS;
                if (i < quads) store_normed(t, i, kept[j], kept_weight[j], scale);
            }
            for (int i = threadIdx.x + NORM_KEPT * GEMV_THREADS; i < quads; i += GEMV_THREADS)
                store_normed(t, i, x[i], weight[i], scale);
        }
    } else {
        const uint4* source = reinterpret_cast<const uint4*>(x_bf16);
        uint4* target = reinterpret_cast<uint4*>(x_shared);
        for (int i = threadIdx.x; i < T * chunks; i += blockDim.x) target[i] = source[i];
    }
    __syncthreads();

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
