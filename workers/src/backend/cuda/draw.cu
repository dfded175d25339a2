// Row draws on the device (Backend::forward_drawn, draw.rs): for each row of logits, what
// RowDraw::from_logits (sampling.rs) computes on the host, in a few hundred bytes instead of the vocabulary:
// the row's largest logit, its tempered and untempered sums, its DRAW_CANDIDATES most likely tokens, and a draw
// over the whole vocabulary in id order. Three launches over chunks of DRAW_CHUNK logits:
// - draw_chunk_top: each chunk's two largest logits (as keys, below). The row's largest is the largest of
//   them, and the DRAW_CANDIDATES-th largest of them all is a floor no candidate of the row is below;
// - draw_chunk_stats: each chunk's sums (the tempered weights rounded to f32 relative to the row's largest, as
//   the host rounds them) and its keys at or above the floor, sorted: a few a chunk, so the sorts stay small;
// - draw_row: the row's totals, its candidates from the chunks' keys, and the draw.
//
// A candidate is a 64-bit key: the logit's bits made to order as unsigned above, 0xffffffff - id below, so
// that sorting keys in descending order ranks logits largest first and equal logits lower id first (top_n's
// order on the host). Keys are unique within a row; key 0 pads.

// All three come from kernels.rs (DRAW_CHUNK, DRAW_MAX_CHUNKS, sampling::DRAW_CANDIDATES) as compile options.
#if !defined(DRAW_CHUNK) || !defined(DRAW_CANDIDATES) || !defined(DRAW_MAX_CHUNKS)
#error "DRAW_CHUNK, DRAW_CANDIDATES and DRAW_MAX_CHUNKS are defined by the compile options"
#endif

// One row's RowDrawParams.
struct DrawParams {
    double inverse_temperature;  // 0: the row does not draw (its argmax)
    double uniform;
};

// One chunk's sums: Σ w, Σ (double)(float)w with w = exp((double)(logit - max) * inverse_temperature), and
// Σ exp((double)logit - (double)max).
struct DrawChunkStats {
    double tempered;
    double tempered_rounded;
    double raw;
};

// What draw_row leaves for one row (read by draw.rs: keep the two in step).
struct DrawOut {
    unsigned drawn_token;
    float drawn_logit;
    double tempered_total;
    double log_normalizer;
    unsigned long long candidates[DRAW_CANDIDATES];
};

__device__ __forceinline__ unsigned long long draw_key(float logit, unsigned id) {
    const unsigned bits = __float_as_uint(logit);
    const unsigned ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (0xffffffffu - id);
}

__device__ __forceinline__ unsigned draw_key_id(unsigned long long key) { return 0xffffffffu - (unsigned)key; }

__device__ __forceinline__ double warp_sum_double(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// The logit of a key.
__device__ __forceinline__ float draw_key_logit(unsigned long long key) {
    const unsigned ordered = (unsigned)(key >> 32);
    return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// The larger of two keys, and the two largest of two sorted pairs.
__device__ __forceinline__ void draw_top_two(unsigned long long& first, unsigned long long& second,
                                             unsigned long long other_first, unsigned long long other_second) {
    if (other_first > first) {
        second = first > other_second ? first : other_second;
        first = other_first;
    } else if (other_first > second) {
        second = other_first;
    }
}

// What every block of a row needs from the chunks' two largest keys (`chunk_top`, 2 * chunks of them): the
// row's largest logit and the floor of its candidates, the DRAW_CANDIDATES-th largest of those keys (0 when
// they are fewer, so that every key passes). Every thread of the block calls it.
__device__ void draw_row_floor(const unsigned long long* chunk_top, int chunks, float* row_max,
                               unsigned long long* floor) {
    __shared__ unsigned long long tops[2 * DRAW_MAX_CHUNKS];
    __shared__ unsigned long long shared_floor;
    const int n = 2 * chunks;
    for (int i = threadIdx.x; i < n; i += blockDim.x) tops[i] = chunk_top[i];
    if (threadIdx.x == 0) shared_floor = 0ull;
    __syncthreads();
    // Keys are unique but pads (0) repeat: the floor is the nonzero key with exactly DRAW_CANDIDATES - 1 above.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned long long key = tops[i];
        if (key == 0ull) continue;
        int above = 0;
        for (int j = 0; j < n; ++j) above += tops[j] > key;
        if (above == DRAW_CANDIDATES - 1) shared_floor = key;
    }
    unsigned long long largest = 0ull;
    for (int c = 0; c < chunks; ++c) largest = tops[2 * c] > largest ? tops[2 * c] : largest;
    __syncthreads();
    *row_max = draw_key_logit(largest);
    *floor = shared_floor;
}

// The tempered weight of one logit, rounded to f32 the way the host rounds it (row_weight in sampling.rs).
__device__ __forceinline__ double draw_weight(float logit, float row_max, double inverse_temperature) {
    return exp((double)(logit - row_max) * inverse_temperature);
}

// Sorts `n` keys (a power of two) of shared memory in descending order on the first warp alone: a sort of a
// few hundred keys is cheaper with warp barriers than with block ones. Every thread of the block calls it,
// after a barrier that follows the keys' stores, and all keys are readable when it returns.
__device__ void draw_sort_descending_warp(unsigned long long* keys, int n);

// One compare-exchange of a bitonic sort that ends descending.
__device__ __forceinline__ void draw_compare_exchange(unsigned long long* keys, int i, int j, int k) {
    const int partner = i ^ j;
    if (partner > i) {
        const unsigned long long a = keys[i], b = keys[partner];
        const bool descending = (i & k) == 0;
        if (descending ? a < b : a > b) {
            keys[i] = b;
            keys[partner] = a;
        }
    }
}

// Sorts `n` keys (a power of two, at least 32 per warp) of shared memory in descending order; every thread of
// the block calls it, after a barrier that follows the keys' stores, and all keys are readable when it returns.
// Each warp owns n / warps consecutive keys, so the stages that compare keys less than that apart run within
// the warp (a warp barrier); only the few wider ones take a block barrier (10 of 78 stages at 4096 keys and
// 16 warps).
__device__ void draw_sort_descending(unsigned long long* keys, int n) {
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int segment = n / warps;
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            if (j >= segment) {
                __syncthreads();
                for (int i = threadIdx.x; i < n; i += blockDim.x) draw_compare_exchange(keys, i, j, k);
                __syncthreads();
            } else {
                for (int t = lane; t < segment; t += 32) draw_compare_exchange(keys, warp * segment + t, j, k);
                __syncwarp();
            }
        }
    }
    __syncthreads();
}

// A thread's share of a chunk: VALUES logits of `row` from `first` (ids below `end`), requested all at once
// (16 bytes a load where the row allows it) so that one memory round trip brings them; ids past `end` get -1.
// The chunk is DRAW_CHUNK logits over blockDim.x * VALUES / 4 threads: lane t takes the 16-byte pieces
// t, t + blockDim.x, ...
template <int VALUES>
__device__ __forceinline__ void draw_load_share(const float* row, int first, int end, float (&values)[VALUES],
                                                int (&ids)[VALUES]) {
    constexpr int PIECES = VALUES / 4;
    const bool aligned = ((((size_t)row) & 15) == 0) && ((first & 3) == 0);
#pragma unroll
    for (int piece = 0; piece < PIECES; ++piece) {
        const int id = first + 4 * (threadIdx.x + piece * blockDim.x);
        if (aligned && id + 3 < end) {
            const float4 v = *reinterpret_cast<const float4*>(row + id);
            values[4 * piece] = v.x;
            values[4 * piece + 1] = v.y;
            values[4 * piece + 2] = v.z;
            values[4 * piece + 3] = v.w;
        } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) values[4 * piece + c] = id + c < end ? row[id + c] : 0.0f;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) ids[4 * piece + c] = id + c < end ? id + c : -1;
    }
}

__device__ void draw_sort_descending_warp(unsigned long long* keys, int n) {
    if (threadIdx.x < 32) {
        for (int k = 2; k <= n; k <<= 1) {
            for (int j = k >> 1; j > 0; j >>= 1) {
                for (int i = threadIdx.x; i < n; i += 32) draw_compare_exchange(keys, i, j, k);
                __syncwarp();
            }
        }
    }
    __syncthreads();
}

// The sort for `n` keys: on one warp up to DRAW_WARP_SORT_MAX, on the whole block above.
#define DRAW_WARP_SORT_MAX 512
__device__ __forceinline__ void draw_sort(unsigned long long* keys, int n) {
    if (n <= DRAW_WARP_SORT_MAX)
        draw_sort_descending_warp(keys, n);
    else
        draw_sort_descending(keys, n);
}

// chunk_top[(row * chunks + chunk) * 2 + 0, 1] = the chunk's largest and second largest keys. Grid (chunks,
// rows), DRAW_CHUNK / 16 threads (16 logits each).
extern "C" __global__ void draw_chunk_top(const float* logits, int vocab_size, unsigned long long* chunk_top) {
    __shared__ unsigned long long warp_tops[32][2];
    const float* row = logits + (size_t)blockIdx.y * vocab_size;
    const int first = blockIdx.x * DRAW_CHUNK, end = min(first + DRAW_CHUNK, vocab_size);
    float values[16];
    int ids[16];
    draw_load_share<16>(row, first, end, values, ids);
    unsigned long long top = 0ull, second = 0ull;
#pragma unroll
    for (int v = 0; v < 16; ++v)
        if (ids[v] >= 0) draw_top_two(top, second, draw_key(values[v], ids[v]), 0ull);
    for (int offset = 16; offset > 0; offset >>= 1) {
        const unsigned long long other_top = __shfl_xor_sync(0xffffffffu, top, offset);
        const unsigned long long other_second = __shfl_xor_sync(0xffffffffu, second, offset);
        draw_top_two(top, second, other_top, other_second);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        warp_tops[warp][0] = top;
        warp_tops[warp][1] = second;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) draw_top_two(top, second, warp_tops[w][0], warp_tops[w][1]);
        unsigned long long* out = chunk_top + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * 2;
        out[0] = top;
        out[1] = second;
    }
}

// Each chunk's sums, and its keys at or above the row's floor: the largest DRAW_CANDIDATES of them, sorted,
// then 0s. Grid (chunks, rows), DRAW_CHUNK / 8 threads (8 logits each).
extern "C" __global__ void draw_chunk_stats(const float* logits, int vocab_size, const DrawParams* params,
                                            const unsigned long long* chunk_top, DrawChunkStats* stats,
                                            unsigned long long* chunk_candidates) {
    __shared__ unsigned long long keys[DRAW_CHUNK];
    __shared__ double warp_sums[3][32];
    __shared__ unsigned kept;
    const int chunks = gridDim.x, chunk = blockIdx.x, row_index = blockIdx.y;
    const float* row = logits + (size_t)row_index * vocab_size;
    float row_max;
    unsigned long long floor;
    if (threadIdx.x == 0) kept = 0;
    draw_row_floor(chunk_top + (size_t)row_index * chunks * 2, chunks, &row_max, &floor);
    const double inverse_temperature = params[row_index].inverse_temperature;
    const int first = chunk * DRAW_CHUNK;
    float values[8];
    int ids[8];
    draw_load_share<8>(row, first, min(first + DRAW_CHUNK, vocab_size), values, ids);
    double tempered = 0.0, tempered_rounded = 0.0, raw = 0.0;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
        const int id = ids[v];
        if (id < 0) continue;
        const float logit = values[v];
        const unsigned long long key = draw_key(logit, id);
        if (key >= floor) keys[atomicAdd(&kept, 1u)] = key;
        raw += exp((double)logit - (double)row_max);
        if (inverse_temperature > 0.0) {
            const double weight = draw_weight(logit, row_max, inverse_temperature);
            tempered += weight;
            tempered_rounded += (double)(float)weight;
        }
    }
    tempered = warp_sum_double(tempered);
    tempered_rounded = warp_sum_double(tempered_rounded);
    raw = warp_sum_double(raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) {
        warp_sums[0][warp] = tempered;
        warp_sums[1][warp] = tempered_rounded;
        warp_sums[2][warp] = raw;
    }
    __syncthreads();  // also: every key is in shared memory
    if (threadIdx.x == 0) {
        DrawChunkStats total = {0.0, 0.0, 0.0};
        for (int w = 0; w < warps; ++w) {
            total.tempered += warp_sums[0][w];
            total.tempered_rounded += warp_sums[1][w];
            total.raw += warp_sums[2][w];
        }
        stats[row_index * chunks + chunk] = total;
    }
    // Sort the kept keys (the order atomics gave them is any), padded with 0s to a power of two.
    const int count = kept;
    int sorted = 1;
    while (sorted < count) sorted <<= 1;
    for (int i = count + threadIdx.x; i < sorted; i += blockDim.x) keys[i] = 0ull;
    __syncthreads();
    draw_sort(keys, sorted);
    const size_t at = (size_t)row_index * chunks + chunk;
    if (threadIdx.x < DRAW_CANDIDATES)
        chunk_candidates[at * DRAW_CANDIDATES + threadIdx.x] = threadIdx.x < count ? keys[threadIdx.x] : 0ull;
}

// One row's totals, candidates and draw. Grid (rows), 1024 threads; dynamic shared memory of
// chunks * DRAW_CANDIDATES rounded up to a power of two 8-byte words. The drawn token also goes to tokens[row],
// where a step queued ahead of the host takes its input (embed's TOKEN_FROM_PREVIOUS_TOKEN).
extern "C" __global__ void draw_row(const float* logits, int vocab_size, int chunks, const DrawParams* params,
                                    const unsigned long long* chunk_top, const DrawChunkStats* stats,
                                    const unsigned long long* chunk_candidates, DrawOut* out, unsigned* tokens) {
    extern __shared__ unsigned long long draw_shared[];
    __shared__ double warp_prefix[32];
    __shared__ int drawn_chunk, drawn_index, last_weighted_index;
    __shared__ double chunk_target;
    // A row has at most DRAW_MAX_CHUNKS chunks (draw_fits in kernels.rs).
    __shared__ double tempered_sums[DRAW_MAX_CHUNKS], rounded_sums[DRAW_MAX_CHUNKS], raw_sums[DRAW_MAX_CHUNKS];
    const int row_index = blockIdx.x;
    const float* row = logits + (size_t)row_index * vocab_size;
    const DrawParams p = params[row_index];
    const DrawChunkStats* row_stats = stats + row_index * chunks;
    DrawOut* o = out + row_index;

    // Everything the row's chunks left, requested at once: the chunks' largest keys (for the row's largest
    // logit), their sums, and their kept keys (0 past each chunk's count), gathered in any order.
    __shared__ unsigned long long largest;
    __shared__ int merged;
    if (threadIdx.x == 0) {
        largest = 0ull;
        merged = 0;
    }
    __syncthreads();
    unsigned long long* keys = draw_shared;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        atomicMax(&largest, chunk_top[((size_t)row_index * chunks + c) * 2]);
        const DrawChunkStats chunk_stats = row_stats[c];
        tempered_sums[c] = chunk_stats.tempered;
        rounded_sums[c] = chunk_stats.tempered_rounded;
        raw_sums[c] = chunk_stats.raw;
    }
    for (int i = threadIdx.x; i < chunks * DRAW_CANDIDATES; i += blockDim.x) {
        const unsigned long long key = chunk_candidates[(size_t)row_index * chunks * DRAW_CANDIDATES + i];
        if (key != 0ull) keys[atomicAdd(&merged, 1)] = key;
    }
    __syncthreads();
    const float row_max = draw_key_logit(largest);

    // The row's candidates: the largest of the kept keys.
    const int count = merged;
    int sorted = 1;
    while (sorted < count) sorted <<= 1;
    for (int i = count + threadIdx.x; i < sorted; i += blockDim.x) keys[i] = 0ull;
    __syncthreads();
    draw_sort(keys, sorted);
    if (threadIdx.x < DRAW_CANDIDATES) o->candidates[threadIdx.x] = keys[threadIdx.x];
    const unsigned argmax = draw_key_id(keys[0]);

    // The totals, in chunk order so that a row sums the same way every time.
    if (threadIdx.x == 0) {
        double tempered = 0.0, raw = 0.0;
        for (int c = 0; c < chunks; ++c) {
            tempered += tempered_sums[c];
            raw += raw_sums[c];
        }
        o->tempered_total = p.inverse_temperature > 0.0 ? tempered : 0.0;
        o->log_normalizer = (double)row_max + log(raw);
        drawn_chunk = -1;
        drawn_index = DRAW_CHUNK;
        last_weighted_index = -1;
        if (p.inverse_temperature > 0.0) {
            // The host subtracts each rounded weight from uniform * total until it falls below zero: find the
            // chunk where that happens, then the token inside it. A sliver left past the end by rounding goes
            // to the last chunk with any weight (and there to its last weighted token).
            double target = p.uniform * tempered;
            for (int c = 0; c < chunks; ++c) {
                if (target - rounded_sums[c] < 0.0) {
                    drawn_chunk = c;
                    break;
                }
                target -= rounded_sums[c];
            }
            if (drawn_chunk < 0) {
                for (int c = chunks - 1; c >= 0; --c)
                    if (rounded_sums[c] > 0.0) {
                        drawn_chunk = c;
                        break;
                    }
                target = __longlong_as_double(0x7ff0000000000000ll);  // +inf: no token passes it
            }
            chunk_target = target;
        }
    }
    __syncthreads();
    if (drawn_chunk < 0) {
        if (threadIdx.x == 0) {
            o->drawn_token = argmax;
            o->drawn_logit = row[argmax];
            tokens[row_index] = argmax;
        }
        return;
    }

    // The drawn chunk's rounded weights, four consecutive a thread, and their running sum over the block.
    const int first = drawn_chunk * DRAW_CHUNK;
    const int base = threadIdx.x * 4;
    double own[4], running = 0.0;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int id = first + base + u;
        own[u] = id < vocab_size ? (double)(float)draw_weight(row[id], row_max, p.inverse_temperature) : 0.0;
        running += own[u];
    }
    // Exclusive prefix of the threads' sums: within the warp, then across warps.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    double inclusive = running;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_prefix[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        double total = warp_prefix[lane];
        for (int offset = 1; offset < 32; offset <<= 1) {
            const double other = __shfl_up_sync(0xffffffffu, total, offset);
            if (lane >= offset) total += other;
        }
        warp_prefix[lane] = total - warp_prefix[lane];  // exclusive
    }
    __syncthreads();
    double before = warp_prefix[warp] + inclusive - running;
    const double target = chunk_target;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        before += own[u];
        if (target - before < 0.0) {
            atomicMin(&drawn_index, base + u);
            break;
        }
    }
    // For the sliver (and rounding between the chunk's sum and this one): its last weighted token.
    int last_weighted = -1;
#pragma unroll
    for (int u = 0; u < 4; ++u)
        if (own[u] > 0.0) last_weighted = base + u;
    if (last_weighted >= 0) atomicMax(&last_weighted_index, last_weighted);
    __syncthreads();
    if (threadIdx.x == 0) {
        const int index = drawn_index < DRAW_CHUNK ? drawn_index : last_weighted_index;
        const unsigned token = index >= 0 ? (unsigned)(first + index) : argmax;
        o->drawn_token = token;
        o->drawn_logit = row[token];
        tokens[row_index] = token;
    }
}
