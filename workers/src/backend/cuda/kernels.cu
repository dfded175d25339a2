// The CUDA backend's NVRTC kernels (compiled at backend start-up; see kernels.rs for their launches).
// bf16 is handled as raw 16-bit words so no CUDA header is needed at run-time compilation: weights, normed
// activations and the KV cache are bf16; residuals, GEMM outputs and every reduction are f32.
// KV pool layout: [block][layer][k=0,v=1][kv_head][slot][dim], the order of KV_LAYOUT.md, in bf16.

typedef unsigned short bf16_t;

// No CUDA headers at run-time compilation, so no INFINITY macro.
#define NEG_INFINITY __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }

// Round to nearest even, NaN kept quiet: the same rounding the host uses when it uploads weights.
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();  // a previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}

// Programmatic dependent launch (sm_90; nothing on older GPUs): let the next kernel of the stream launch now
// (it still waits for this one before touching its results), and wait for the previous kernel's results.
__device__ __forceinline__ void allow_next_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Starts fetching `bytes` (a multiple of 16, 16-byte aligned) at `address` into L2.
__device__ __forceinline__ void prefetch_l2(const void* address, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(address), "r"(bytes) : "memory");
#endif
}

// token_ids[t] marking a step queued before the host knew its tokens: take the previous step's pick for row t,
// from its fused argmax's key (`previous_keys`) or from where `argmax_rows` or `draw_row` left it
// (`previous_tokens`). Vocabularies stop far below these ids.
#define TOKEN_FROM_PREVIOUS_KEY 0xffffffffu
#define TOKEN_FROM_PREVIOUS_TOKEN 0xfffffffeu

// hidden[t, :] = embedding[token_ids[t], :]; argmax_keys[t] = 0 for this step's fused argmax, when given.
extern "C" __global__ void embed(float* hidden, const bf16_t* embedding, const unsigned* token_ids, int hidden_size,
                                 unsigned long long* argmax_keys, const unsigned long long* previous_keys,
                                 const unsigned* previous_tokens) {
    allow_next_grid();
    wait_for_previous_grid();
    unsigned token = token_ids[blockIdx.x];
    if (token == TOKEN_FROM_PREVIOUS_KEY) {
        // The low half of a key is 0xffffffff - token (argmax_key in decode_gemv.cu); a key of 0 (no logit)
        // embeds token 0, and the host reports the previous step's missing token when it reads the key.
        const unsigned long long key = previous_keys[blockIdx.x];
        token = key == 0 ? 0u : 0xffffffffu - (unsigned)key;
    } else if (token == TOKEN_FROM_PREVIOUS_TOKEN) {
        token = previous_tokens[blockIdx.x];
    }
    // This step's argmax reuses the keys the line above may read: every thread has its token before the reset.
    __syncthreads();
    if (argmax_keys && threadIdx.x == 0) argmax_keys[blockIdx.x] = 0;
    const size_t row = (size_t)token * hidden_size;
    float* out = hidden + (size_t)blockIdx.x * hidden_size;
    for (int i = threadIdx.x; i < hidden_size; i += blockDim.x) out[i] = bf2f(embedding[row + i]);
}

// Output row r reads hidden row rows[r] (or r when rows is null). With delta, the residual is added first
// (hidden += delta, in place); then out[r] = weight * hidden / rms(hidden), as Qwen3RMSNorm in f32.
extern "C" __global__ void add_rms_norm(float* hidden, const float* delta, const float* weight, bf16_t* out,
                                        const unsigned* rows, int hidden_size, float eps) {
    const size_t row = rows ? rows[blockIdx.x] : blockIdx.x;
    float* x = hidden + row * hidden_size;
    float sum_squares = 0.0f;
    for (int i = threadIdx.x; i < hidden_size; i += blockDim.x) {
        float v = x[i];
        if (delta) {
            v += delta[row * hidden_size + i];
            x[i] = v;
        }
        sum_squares += v * v;
    }
    const float scale = 1.0f / sqrtf(block_sum(sum_squares) / hidden_size + eps);
    bf16_t* o = out + (size_t)blockIdx.x * hidden_size;
    for (int i = threadIdx.x; i < hidden_size; i += blockDim.x) o[i] = f2bf(weight[i] * (x[i] * scale));
}

// One warp per (token, head) of the qkv projection, QK_ROPE_WARPS heads of one token a block (grid: tokens,
// heads / QK_ROPE_WARPS rounded up): q heads first (RMSNorm, RoPE, written to q_out in f32), then k heads
// (RMSNorm, RoPE, into the cache), then v heads (into the cache). Lane l owns the rotate-half pairs
// (i, i + head_dim / 2) for i = l, l + 32, ...; a warp per head keeps the norm's sum a warp reduction, with no
// block barrier, and a block per token keeps a long prompt's launch to a few blocks per token.
#define QK_ROPE_WARPS 8
#define QK_ROPE_MAX_PAIRS_PER_LANE 4  // head_dim up to 256
extern "C" __global__ void __launch_bounds__(QK_ROPE_WARPS * 32) qk_norm_rope_store(
    const float* qkv, float* q_out, bf16_t* kv_pool, const float* q_norm, const float* k_norm, const float* inv_freq,
    const unsigned* positions, const unsigned* kv_blocks, int num_q_heads, int num_kv_heads, int head_dim, int layer,
    int block_size, size_t block_elems, float eps) {
    allow_next_grid();
    wait_for_previous_grid();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int token = blockIdx.x, head = blockIdx.y * QK_ROPE_WARPS + warp, half = head_dim / 2;
    if (head >= num_q_heads + 2 * num_kv_heads) return;
    const int q_dim = num_q_heads * head_dim, kv_dim = num_kv_heads * head_dim;
    const float* row = qkv + (size_t)token * (q_dim + 2 * kv_dim);
    const unsigned position = positions[token];
    const size_t slot_base = (size_t)kv_blocks[token] * block_elems;
    const int slot = position % block_size;
    if (head >= num_q_heads + num_kv_heads) {  // v: stored as projected
        const int kv_head = head - num_q_heads - num_kv_heads;
        const float* v = row + q_dim + kv_dim + kv_head * head_dim;
        bf16_t* dst = kv_pool + slot_base + ((size_t)((layer * 2 + 1) * num_kv_heads + kv_head) * block_size + slot) * head_dim;
        for (int d = lane; d < head_dim; d += 32) dst[d] = f2bf(v[d]);
        return;
    }
    const bool is_q = head < num_q_heads;
    const float* x = is_q ? row + head * head_dim : row + q_dim + (head - num_q_heads) * head_dim;
    const float* norm = is_q ? q_norm : k_norm;
    float x1[QK_ROPE_MAX_PAIRS_PER_LANE], x2[QK_ROPE_MAX_PAIRS_PER_LANE];
    float sum_squares = 0.0f;
#pragma unroll
    for (int j = 0; j < QK_ROPE_MAX_PAIRS_PER_LANE; ++j) {
        const int i = lane + 32 * j;
        x1[j] = i < half ? x[i] : 0.0f;
        x2[j] = i < half ? x[i + half] : 0.0f;
        sum_squares += x1[j] * x1[j] + x2[j] * x2[j];
    }
    const float scale = 1.0f / sqrtf(warp_sum(sum_squares) / head_dim + eps);
    float* q_dst = q_out + ((size_t)token * num_q_heads + head) * head_dim;
    bf16_t* k_dst = kv_pool + slot_base +
                    ((size_t)(layer * 2 * num_kv_heads + (head - num_q_heads)) * block_size + slot) * head_dim;
#pragma unroll
    for (int j = 0; j < QK_ROPE_MAX_PAIRS_PER_LANE; ++j) {
        const int i = lane + 32 * j;
        if (i >= half) break;
        const float normed1 = norm[i] * (x1[j] * scale), normed2 = norm[i + half] * (x2[j] * scale);
        const float angle = (float)position * inv_freq[i];
        const float c = cosf(angle), s = sinf(angle);
        const float r1 = normed1 * c - normed2 * s, r2 = normed2 * c + normed1 * s;
        if (is_q) {
            q_dst[i] = r1;
            q_dst[i + half] = r2;
        } else {
            k_dst[i] = f2bf(r1);
            k_dst[i + half] = f2bf(r2);
        }
    }
}

#define MAX_DIMS_PER_LANE 8  // head_dim <= 256
#define ATTENTION_WARPS 4
#define MAX_MERGED_SPLITS 1024  // most splits of one (token, q_head), see MAX_ATTENTION_SPLITS in kernels.rs
#define MERGE_LOADS 8  // partial rows in flight per lane in merge_splits
// q heads a block of attention_decode_grouped covers.
#define MAX_ATTENTION_GROUP 2

// Merges the splits first..first+num_splits of one (token, q_head) into its normalized bf16 output, or with
// GROUP > 1 (head_dim 128 only) of GROUP consecutive q heads, head h's splits at first + h * num_splits and its
// output at out_row + h * head_dim. L2 reads (__ldcg): other blocks of the same launch wrote the partials.
// Called by every thread of a block. head_dim 128 (the usual size) takes one round trip to L2: each warp loads
// MERGE_LOADS splits' rows of every head together with their maxima and sums, and keeps its own running
// maximum, which the warps' sums are rescaled to at the end. Other sizes first weigh every split (warp 0),
// then sum the rows: two round trips.
template <int GROUP>
__device__ void merge_splits(const float* partial_out, const float* partial_max_sum, size_t first, int num_splits,
                             int head_dim, bf16_t* out_row) {
    __shared__ __align__(16) float warp_value[ATTENTION_WARPS][GROUP * 32 * MAX_DIMS_PER_LANE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (head_dim == 128) {
        __shared__ float warp_max[GROUP][ATTENTION_WARPS], warp_total[GROUP][ATTENTION_WARPS];
        const int d = 4 * lane;
        float4 value[GROUP];
        float running_max[GROUP], total[GROUP];
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            value[h] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            running_max[h] = NEG_INFINITY;
            total[h] = 0.0f;
        }
        for (int s = warp; s < num_splits; s += ATTENTION_WARPS * MERGE_LOADS) {
            float4 part[GROUP][MERGE_LOADS];
            float2 max_sum[GROUP][MERGE_LOADS];
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
#pragma unroll
                for (int u = 0; u < MERGE_LOADS; ++u) {
                    const int split = s + ATTENTION_WARPS * u;
                    // Head h's partials follow head 0's by h * num_splits rows. (Written so, the one-head merge
                    // keeps stop 20's registers: 90 in attention_decode_fused, not 92.)
                    const size_t at = first + (size_t)h * num_splits + split;
                    max_sum[h][u] = make_float2(NEG_INFINITY, 0.0f);
                    if (split < num_splits) {
                        part[h][u] = __ldcg(reinterpret_cast<const float4*>(
                            &partial_out[(first + split) * head_dim + (size_t)h * num_splits * head_dim + d]));
                        max_sum[h][u] = __ldcg(reinterpret_cast<const float2*>(&partial_max_sum[2 * at]));
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                float new_max = running_max[h];
#pragma unroll
                for (int u = 0; u < MERGE_LOADS; ++u)
                    if (max_sum[h][u].y > 0.0f) new_max = fmaxf(new_max, max_sum[h][u].x);
                if (new_max == NEG_INFINITY) continue;  // only empty splits so far
                const float rescale = total[h] > 0.0f ? expf(running_max[h] - new_max) : 0.0f;
                value[h].x *= rescale;
                value[h].y *= rescale;
                value[h].z *= rescale;
                value[h].w *= rescale;
                total[h] *= rescale;
#pragma unroll
                for (int u = 0; u < MERGE_LOADS; ++u) {
                    if (!(max_sum[h][u].y > 0.0f)) continue;
                    const float weight = expf(max_sum[h][u].x - new_max);
                    value[h].x += part[h][u].x * weight;
                    value[h].y += part[h][u].y * weight;
                    value[h].z += part[h][u].z * weight;
                    value[h].w += part[h][u].w * weight;
                    total[h] += max_sum[h][u].y * weight;
                }
                running_max[h] = new_max;
            }
        }
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            *reinterpret_cast<float4*>(&warp_value[warp][h * 128 + d]) = value[h];
            if (lane == 0) {
                warp_max[h][warp] = running_max[h];
                warp_total[h][warp] = total[h];
            }
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            float block_max = NEG_INFINITY;
#pragma unroll
            for (int w = 0; w < ATTENTION_WARPS; ++w)
                if (warp_total[h][w] > 0.0f) block_max = fmaxf(block_max, warp_max[h][w]);
            float factor[ATTENTION_WARPS], block_total = 0.0f;
#pragma unroll
            for (int w = 0; w < ATTENTION_WARPS; ++w) {
                factor[w] = warp_total[h][w] > 0.0f ? expf(warp_max[h][w] - block_max) : 0.0f;
                block_total += warp_total[h][w] * factor[w];
            }
            const float inverse_total = 1.0f / block_total;
            for (int i = threadIdx.x; i < 128; i += blockDim.x) {
                float merged = 0.0f;
#pragma unroll
                for (int w = 0; w < ATTENTION_WARPS; ++w) merged += warp_value[w][h * 128 + i] * factor[w];
                out_row[h * 128 + i] = f2bf(merged * inverse_total);
            }
        }
        return;
    }
    __shared__ float split_weight[MAX_MERGED_SPLITS];
    __shared__ float merged_inverse_total;
    if (threadIdx.x < 32) {
        float m = NEG_INFINITY;
        for (int s = lane; s < num_splits; s += 32) {
            const float sum = __ldcg(&partial_max_sum[2 * (first + s) + 1]);
            if (sum > 0.0f) m = fmaxf(m, __ldcg(&partial_max_sum[2 * (first + s)]));
        }
        for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
        float t = 0.0f;
        for (int s = lane; s < num_splits; s += 32) {
            const float sum = __ldcg(&partial_max_sum[2 * (first + s) + 1]);
            const float w = sum > 0.0f ? expf(__ldcg(&partial_max_sum[2 * (first + s)]) - m) : 0.0f;
            split_weight[s] = w;
            t += sum * w;
        }
        t = warp_sum(t);
        if (lane == 0) merged_inverse_total = 1.0f / t;
    }
    __syncthreads();
    // Each warp sums every ATTENTION_WARPS-th split, then the warps' sums are added.
    for (int d = lane; d < head_dim; d += 32) {
        float value = 0.0f;
        for (int s = warp; s < num_splits; s += ATTENTION_WARPS)
            value += __ldcg(&partial_out[(first + s) * head_dim + d]) * split_weight[s];
        warp_value[warp][d] = value;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float value = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTENTION_WARPS; ++w) value += warp_value[w][d];
        out_row[d] = f2bf(value * merged_inverse_total);
    }
}

// The keys of one split of one (token, q_head) and where they lie in the paged cache.
struct KeyRange {
    const bf16_t* kv_pool;
    const unsigned* table;
    int block_size;
    size_t block_elems, k_offset, v_offset;
    int first_key, end_key;
};

#define ATTENTION_LOADS 4  // keys per lane in flight in attend_keys_vec

// The K and V rows (this lane's 8 dims) of the keys this lane reads in the step starting at `base`: key
// base + sub + KEYS_PER_LOAD * j for j < ATTENTION_LOADS. Key `new_key` is made in this launch
// (attention_decode_fused): it comes from new_k/new_v (shared memory), or stays unloaded when they are null.
template <int LANES_PER_KEY>
__device__ __forceinline__ void load_key_rows(const KeyRange& keys, int base, int new_key, const bf16_t* new_k,
                                              const bf16_t* new_v, uint4 (&k_rows)[ATTENTION_LOADS],
                                              uint4 (&v_rows)[ATTENTION_LOADS]) {
    constexpr int KEYS_PER_LOAD = 32 / LANES_PER_KEY;
    constexpr int HEAD_DIM = LANES_PER_KEY * 8;
    const int lane = threadIdx.x & 31;
    const int sub = lane / LANES_PER_KEY, dim0 = (lane % LANES_PER_KEY) * 8;
#pragma unroll
    for (int j = 0; j < ATTENTION_LOADS; ++j) {
        const int key = base + sub + KEYS_PER_LOAD * j;
        if (key >= keys.end_key) continue;
        if (key == new_key) {
            if (new_k) {
                k_rows[j] = *reinterpret_cast<const uint4*>(new_k + dim0);
                v_rows[j] = *reinterpret_cast<const uint4*>(new_v + dim0);
            }
            continue;
        }
        const size_t at = (size_t)keys.table[key / keys.block_size] * keys.block_elems +
                          (size_t)(key % keys.block_size) * HEAD_DIM + dim0;
        k_rows[j] = *reinterpret_cast<const uint4*>(keys.kv_pool + at + keys.k_offset);
        v_rows[j] = *reinterpret_cast<const uint4*>(keys.kv_pool + at + keys.v_offset);
    }
}

// One warp's share of `keys` (every WARPS-th group of keys, the block's warps) with an online softmax, for GROUP q
// heads (q_heads: GROUP rows of head_dim) that share the keys: LANES_PER_KEY lanes read one key with 16-byte
// loads (head_dim = 8 * LANES_PER_KEY), and each lane has ATTENTION_LOADS keys' K and V rows in flight at once,
// so a split costs about one memory round trip rather than one per key. With first_loaded, k_rows/v_rows
// already hold the warp's first step. Leaves the warp's unnormalized output of head h in acc_rows[h * head_dim..]
// and its running max and sum in out_max[h] and out_sum[h].
template <int LANES_PER_KEY, int GROUP, int WARPS = ATTENTION_WARPS>
__device__ __forceinline__ void attend_keys_vec(const float* q_heads, float scale, const KeyRange& keys,
                                                int new_key, const bf16_t* new_k, const bf16_t* new_v,
                                                bool first_loaded, uint4 (&k_rows)[ATTENTION_LOADS],
                                                uint4 (&v_rows)[ATTENTION_LOADS], float* acc_rows,
                                                float (&out_max)[GROUP], float (&out_sum)[GROUP]) {
    constexpr int KEYS_PER_LOAD = 32 / LANES_PER_KEY;
    constexpr int KEYS_PER_STEP = KEYS_PER_LOAD * ATTENTION_LOADS;
    constexpr int HEAD_DIM = LANES_PER_KEY * 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane / LANES_PER_KEY, dim0 = (lane % LANES_PER_KEY) * 8;
    float q8[GROUP][8], acc[GROUP][8], running_max[GROUP], running_sum[GROUP];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        // Two 16-byte loads: dim0 is a multiple of 8 and every q row starts 16-byte aligned.
        const float4* q_quads = reinterpret_cast<const float4*>(q_heads + h * HEAD_DIM + dim0);
        const float4 low = q_quads[0], high = q_quads[1];
        const float q_dims[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            q8[h][i] = q_dims[i] * scale;
            acc[h][i] = 0.0f;
        }
        running_max[h] = NEG_INFINITY;
        running_sum[h] = 0.0f;
    }
    const int first_base = keys.first_key + warp * KEYS_PER_STEP;
    for (int base = first_base; base < keys.end_key; base += WARPS * KEYS_PER_STEP) {
        if (!(first_loaded && base == first_base))
            load_key_rows<LANES_PER_KEY>(keys, base, new_key, new_k, new_v, k_rows, v_rows);
        float score[GROUP][ATTENTION_LOADS], step_max[GROUP];
#pragma unroll
        for (int h = 0; h < GROUP; ++h) step_max[h] = NEG_INFINITY;
#pragma unroll
        for (int j = 0; j < ATTENTION_LOADS; ++j) {
            const bool valid = base + sub + KEYS_PER_LOAD * j < keys.end_key;
            const unsigned words[4] = {k_rows[j].x, k_rows[j].y, k_rows[j].z, k_rows[j].w};
#pragma unroll
            for (int h = 0; h < GROUP; ++h) {
                float dot = 0.0f;
                if (valid) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        dot = fmaf(q8[h][2 * i], __uint_as_float(words[i] << 16), dot);
                        dot = fmaf(q8[h][2 * i + 1], __uint_as_float(words[i] & 0xffff0000u), dot);
                    }
                }
#pragma unroll
                for (int offset = LANES_PER_KEY / 2; offset > 0; offset >>= 1)
                    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
                score[h][j] = valid ? dot : NEG_INFINITY;
                step_max[h] = fmaxf(step_max[h], score[h][j]);
            }
        }
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
#pragma unroll
            for (int offset = 16; offset >= LANES_PER_KEY; offset >>= 1)
                step_max[h] = fmaxf(step_max[h], __shfl_xor_sync(0xffffffffu, step_max[h], offset));
            // The step's first key is always valid, so new_max is finite.
            const float new_max = fmaxf(running_max[h], step_max[h]);
            const float correction = expf(running_max[h] - new_max);
            float step_sum = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[h][i] *= correction;
#pragma unroll
            for (int j = 0; j < ATTENTION_LOADS; ++j) {
                if (score[h][j] == NEG_INFINITY) continue;
                const float weight = expf(score[h][j] - new_max);
                step_sum += weight;
                const unsigned words[4] = {v_rows[j].x, v_rows[j].y, v_rows[j].z, v_rows[j].w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    acc[h][2 * i] = fmaf(weight, __uint_as_float(words[i] << 16), acc[h][2 * i]);
                    acc[h][2 * i + 1] = fmaf(weight, __uint_as_float(words[i] & 0xffff0000u), acc[h][2 * i + 1]);
                }
            }
#pragma unroll
            for (int offset = 16; offset >= LANES_PER_KEY; offset >>= 1)
                step_sum += __shfl_xor_sync(0xffffffffu, step_sum, offset);
            running_sum[h] = running_sum[h] * correction + step_sum;
            running_max[h] = new_max;
        }
    }
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int offset = 16; offset >= LANES_PER_KEY; offset >>= 1)
                acc[h][i] += __shfl_xor_sync(0xffffffffu, acc[h][i], offset);
        }
        if (sub == 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc_rows[h * HEAD_DIM + dim0 + i] = acc[h][i];
        }
        out_max[h] = running_max[h];
        out_sum[h] = running_sum[h];
    }
}

// What attention_decode_fused reads to make, per block, its own q and the step's new key and value: the qkv
// projection of the step and the q/k norms and RoPE frequencies (qk_norm_rope_store's work).
struct FusedQkv {
    const float* qkv;
    const float* q_norm;
    const float* k_norm;
    const float* inv_freq;
    float eps;
};

// What a thread needs for the rotate-half pair (i, i + head_dim / 2) of one head: RoPE's cosine and sine at
// the step's position and the q and k norm weights of the pair (identity past the half). None of it depends
// on the previous kernel, so attention_decode_fused reads and computes it before the wait.
struct RopePair {
    float c, s, q_weight1, q_weight2, k_weight1, k_weight2;
};

__device__ __forceinline__ RopePair rope_pair(const float* q_norm, const float* k_norm, const float* inv_freq,
                                              unsigned position, int head_dim, int i) {
    const int half = head_dim / 2;
    RopePair pair = {1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (i < half) {
        const float angle = (float)position * inv_freq[i];
        pair.c = cosf(angle);
        pair.s = sinf(angle);
        pair.q_weight1 = q_norm[i];
        pair.q_weight2 = q_norm[i + half];
        pair.k_weight1 = k_norm[i];
        pair.k_weight2 = k_norm[i + half];
    }
    return pair;
}

// The pair (x1, x2) of one head RMS-normed by `scale` (1 / rms of the head) and its weights, then rotated by
// RoPE: (value at i, value at i + head_dim / 2), qk_norm_rope_store's arithmetic.
__device__ __forceinline__ float2 norm_rope(float x1, float x2, float weight1, float weight2, float scale,
                                            const RopePair& pair) {
    const float normed1 = weight1 * (x1 * scale), normed2 = weight2 * (x2 * scale);
    return make_float2(normed1 * pair.c - normed2 * pair.s, normed2 * pair.c + normed1 * pair.s);
}

// A new key's K or V pair in bf16: dims i and i + half of `made` (shared memory), and of the cache row at
// slot + offset when this block stores the key (`slot` not null).
__device__ __forceinline__ void store_new_pair(bf16_t* made, bf16_t* slot, size_t offset, int i, int half,
                                               float first, float second) {
    made[i] = f2bf(first);
    made[i + half] = f2bf(second);
    if (slot) {
        slot[offset + i] = made[i];
        slot[offset + i + half] = made[i + half];
    }
}

// RMSNorm over one head whose pair (x1, x2) this thread holds (zeros past the half), then RoPE, into
// out[0..head_dim): qk_norm_rope_store's arithmetic, except that its sum of squares is reduced over the block
// here and over a warp there, so the two may differ in the last bit.
__device__ __forceinline__ void norm_rope_pair(float x1, float x2, float weight1, float weight2, const RopePair& pair,
                                               int head_dim, float eps, float* out) {
    const int half = head_dim / 2, i = threadIdx.x;
    const float scale = 1.0f / sqrtf(block_sum(x1 * x1 + x2 * x2) / head_dim + eps);
    if (i < half) {
        const float2 rotated = norm_rope(x1, x2, weight1, weight2, scale, pair);
        out[i] = rotated.x;
        out[i + half] = rotated.y;
    }
}

// The warp's first step's copy of the step's new key (made in shared memory), which the loads before the wait
// left out: into the rows of the lanes that hold key `new_key` of the step starting at `first_base`.
template <int LANES_PER_KEY>
__device__ __forceinline__ void place_new_key(int first_base, int new_key, const bf16_t* new_k, const bf16_t* new_v,
                                              uint4 (&k_rows)[ATTENTION_LOADS], uint4 (&v_rows)[ATTENTION_LOADS]) {
    const int lane = threadIdx.x & 31, dim0 = (lane % LANES_PER_KEY) * 8;
#pragma unroll
    for (int j = 0; j < ATTENTION_LOADS; ++j) {
        if (first_base + lane / LANES_PER_KEY + (32 / LANES_PER_KEY) * j == new_key) {
            k_rows[j] = *reinterpret_cast<const uint4*>(new_k + dim0);
            v_rows[j] = *reinterpret_cast<const uint4*>(new_v + dim0);
        }
    }
}

// One split's walk over its keys for head_dim = 8 * LANES_PER_KEY, for the GROUP q heads head..head+GROUP-1.
// FUSED (attention_decode_fused/_grouped, one token per sequence): the K and V of the warp's first keys are
// loaded before the wait for the previous kernel, since only the step's own key (`position`) is written by this
// step; then the block makes its q from the qkv projection, and the block whose split holds `position` makes
// that key's K and V (and, when stores_new_key, stores them in the cache for later steps). GROUP > 1 (FUSED,
// head_dim 128 only) makes every head's q and the new key in one barrier round: thread t holds pair t % half
// of q head t / half, the first half of the threads also the new key's K pair, the next half its V pair.
template <int LANES_PER_KEY, bool FUSED, int GROUP>
__device__ __forceinline__ void split_walk(const float* q_head, const FusedQkv& fused, const KeyRange& keys,
                                           unsigned position, int q_dim, int kv_dim, int head, int kv_head,
                                           bool stores_new_key, float scale, float* acc_rows,
                                           float (&out_max)[GROUP], float (&out_sum)[GROUP]) {
    constexpr int HEAD_DIM = LANES_PER_KEY * 8;
    constexpr int KEYS_PER_STEP = 32 / LANES_PER_KEY * ATTENTION_LOADS;
    constexpr int HALF = HEAD_DIM / 2;
    static_assert(GROUP == 1 || (FUSED && HALF % 32 == 0 && GROUP * HALF == ATTENTION_WARPS * 32),
                  "grouped heads need whole warps a head and one pair a thread");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    uint4 k_rows[ATTENTION_LOADS], v_rows[ATTENTION_LOADS];
    const int first_base = keys.first_key + warp * KEYS_PER_STEP;
    if (!FUSED) {
        wait_for_previous_grid();
        attend_keys_vec<LANES_PER_KEY, GROUP>(q_head, scale, keys, -1, nullptr, nullptr, false, k_rows, v_rows,
                                              acc_rows, out_max, out_sum);
        return;
    }
    const int new_key = (int)position;
    if (first_base < keys.end_key) load_key_rows<LANES_PER_KEY>(keys, first_base, new_key, nullptr, nullptr, k_rows, v_rows);
    const int pair_head = GROUP == 1 ? 0 : (int)threadIdx.x / HALF;
    const int i = GROUP == 1 ? (int)threadIdx.x : (int)threadIdx.x % HALF;
    const RopePair rope = rope_pair(fused.q_norm, fused.k_norm, fused.inv_freq, position, HEAD_DIM, i);
    const bool holds_new_key = keys.first_key <= new_key && new_key < keys.end_key;
    bf16_t* new_slot = nullptr;
    if (holds_new_key && stores_new_key)
        new_slot = const_cast<bf16_t*>(keys.kv_pool) + (size_t)keys.table[new_key / keys.block_size] * keys.block_elems +
                   (size_t)(new_key % keys.block_size) * HEAD_DIM;
    wait_for_previous_grid();
    __shared__ __align__(16) float q_made[GROUP * HEAD_DIM];
    __shared__ float k_made[HEAD_DIM];
    __shared__ __align__(16) bf16_t new_k[HEAD_DIM], new_v[HEAD_DIM];
    // This thread's pair of its q head, and for the block holding the new key of its K head and (at the same
    // dims) of its V head, all loaded at once.
    const float* row = fused.qkv + (size_t)blockIdx.x * (q_dim + 2 * kv_dim);
    const bool in_half = i < HALF;
    const float* q_row = row + (head + pair_head) * HEAD_DIM;
    const float* k_row = row + q_dim + kv_head * HEAD_DIM;
    const float* v_row = row + q_dim + kv_dim + kv_head * HEAD_DIM;
    const float q1 = in_half ? q_row[i] : 0.0f, q2 = in_half ? q_row[i + HALF] : 0.0f;
    float k1 = 0.0f, k2 = 0.0f, v1 = 0.0f, v2 = 0.0f;
    if (GROUP == 1) {
        if (holds_new_key && in_half) {
            k1 = k_row[i];
            k2 = k_row[i + HALF];
            v1 = v_row[i];
            v2 = v_row[i + HALF];
        }
        norm_rope_pair(q1, q2, rope.q_weight1, rope.q_weight2, rope, HEAD_DIM, fused.eps, q_made);
        if (holds_new_key) {
            norm_rope_pair(k1, k2, rope.k_weight1, rope.k_weight2, rope, HEAD_DIM, fused.eps, k_made);
            __syncthreads();
            if (in_half) {
                new_k[i] = f2bf(k_made[i]);
                new_k[i + HALF] = f2bf(k_made[i + HALF]);
                new_v[i] = f2bf(v1);
                new_v[i + HALF] = f2bf(v2);
                if (new_slot) {
                    new_slot[keys.k_offset + i] = new_k[i];
                    new_slot[keys.k_offset + i + HALF] = new_k[i + HALF];
                    new_slot[keys.v_offset + i] = new_v[i];
                    new_slot[keys.v_offset + i + HALF] = new_v[i + HALF];
                }
            }
        }
    } else {
        if (holds_new_key && pair_head == 0) {
            k1 = k_row[i];
            k2 = k_row[i + HALF];
        } else if (holds_new_key && pair_head == 1) {
            v1 = v_row[i];
            v2 = v_row[i + HALF];
        }
        // Each warp's sums of squares (its q head's, and the new key's in the first half), then one barrier.
        constexpr int WARPS_PER_HEAD = HALF / 32;
        __shared__ float q_squares[ATTENTION_WARPS], k_squares[ATTENTION_WARPS];
        const float q_sum = warp_sum(q1 * q1 + q2 * q2), k_sum = warp_sum(k1 * k1 + k2 * k2);
        if (lane == 0) {
            q_squares[warp] = q_sum;
            k_squares[warp] = k_sum;
        }
        __syncthreads();
        float q_total = 0.0f, k_total = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS_PER_HEAD; ++w) {
            q_total += q_squares[pair_head * WARPS_PER_HEAD + w];
            k_total += k_squares[w];
        }
        // RMSNorm of a pair with the head's sum of squares, then RoPE.
        auto inverse_rms = [&](float total) { return 1.0f / sqrtf(total / HEAD_DIM + fused.eps); };
        const float2 q_pair = norm_rope(q1, q2, rope.q_weight1, rope.q_weight2, inverse_rms(q_total), rope);
        q_made[pair_head * HEAD_DIM + i] = q_pair.x;
        q_made[pair_head * HEAD_DIM + i + HALF] = q_pair.y;
        if (holds_new_key && pair_head == 0) {
            const float2 k_pair = norm_rope(k1, k2, rope.k_weight1, rope.k_weight2, inverse_rms(k_total), rope);
            store_new_pair(new_k, new_slot, keys.k_offset, i, HALF, k_pair.x, k_pair.y);
        } else if (holds_new_key && pair_head == 1) {
            store_new_pair(new_v, new_slot, keys.v_offset, i, HALF, v1, v2);
        }
    }
    __syncthreads();
    if (holds_new_key) place_new_key<LANES_PER_KEY>(first_base, new_key, new_k, new_v, k_rows, v_rows);
    attend_keys_vec<LANES_PER_KEY, GROUP>(q_made, scale, keys, new_key, new_k, new_v, true, k_rows, v_rows,
                                          acc_rows, out_max, out_sum);
}

// The same for any even head_dim up to MAX_DIMS_PER_LANE * 32: one key per warp at a time, 2-byte loads.
__device__ __forceinline__ void attend_keys_scalar(const float* q_head, float scale, int head_dim,
                                                   const KeyRange& keys, float* acc_row, float& out_max,
                                                   float& out_sum) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float q_lane[MAX_DIMS_PER_LANE], acc[MAX_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < MAX_DIMS_PER_LANE; ++r) {
        const int d = lane + 32 * r;
        q_lane[r] = d < head_dim ? q_head[d] * scale : 0.0f;
        acc[r] = 0.0f;
    }
    float running_max = NEG_INFINITY, running_sum = 0.0f;
    for (int key = keys.first_key + warp; key < keys.end_key; key += ATTENTION_WARPS) {
        const size_t base = (size_t)keys.table[key / keys.block_size] * keys.block_elems +
                            (size_t)(key % keys.block_size) * head_dim;
        const bf16_t* k = keys.kv_pool + base + keys.k_offset;
        float dot = 0.0f;
#pragma unroll
        for (int r = 0; r < MAX_DIMS_PER_LANE; ++r) {
            const int d = lane + 32 * r;
            if (d < head_dim) dot += q_lane[r] * bf2f(k[d]);
        }
        const float score = warp_sum(dot);
        const float new_max = fmaxf(running_max, score);
        const float correction = expf(running_max - new_max);
        const float weight = expf(score - new_max);
        running_sum = running_sum * correction + weight;
        running_max = new_max;
        const bf16_t* v = keys.kv_pool + base + keys.v_offset;
#pragma unroll
        for (int r = 0; r < MAX_DIMS_PER_LANE; ++r) {
            const int d = lane + 32 * r;
            if (d < head_dim) acc[r] = acc[r] * correction + weight * bf2f(v[d]);
        }
    }
#pragma unroll
    for (int r = 0; r < MAX_DIMS_PER_LANE; ++r) acc_row[lane + 32 * r] = acc[r];
    out_max = running_max;
    out_sum = running_sum;
}

// Causal attention over the paged cache, split over the context: block (token, q_head, split) covers the
// split-th of gridDim.z equal parts of keys 0..=position (each token's context is divided by its own
// length, so the launch shape depends only on the batch), one key per warp at a time with an online
// softmax; the last split of a (token, q_head) to finish (split_counters counts them, and is left at 0 again
// for the next launch) merges all splits into the normalized bf16 output for o_proj: no combine launch. Used
// for small steps, where launches bound the step (attention_partial_merged up to two tokens, the fused decode
// attention up to four sequences). Without split_counters (attention_partial:
// larger steps, where the in-place merge measured slower, see PERF.md) every split leaves its partial for
// attention_combine. With GROUP > 1 (attention_decode_grouped), block (token, kv_head, split) does the same
// for the GROUP q heads of its KV head, reading their keys once; its counter is its first q head's.
// token_meta[t] = (position, offset of its sequence's block table from block_tables).
template <bool FUSED, int GROUP>
__device__ __forceinline__ void attention_split(const float* q, const bf16_t* kv_pool, const unsigned* block_tables,
                                                const unsigned* token_meta, float* partial_out,
                                                float* partial_max_sum, unsigned* split_counters, bf16_t* out,
                                                int num_q_heads, int num_kv_heads, int head_dim, int layer,
                                                int block_size, size_t block_elems, float scale,
                                                const FusedQkv& fused) {
    // The step metadata is uploaded before the step's first kernel, so it may be read before the wait.
    allow_next_grid();
    const int token = blockIdx.x, split = blockIdx.z, num_splits = gridDim.z;
    const int head = GROUP == 1 ? blockIdx.y : blockIdx.y * GROUP;  // the block's first q head
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned position = token_meta[2 * token];
    const unsigned* table = block_tables + token_meta[2 * token + 1];
    const int kv_head = GROUP == 1 ? head / (num_q_heads / num_kv_heads) : blockIdx.y;
    const int keys_per_split = ((int)position + num_splits) / num_splits;
    const int first_key = split * keys_per_split;
    const int end_key = min((int)position + 1, first_key + keys_per_split);
    const size_t k_offset = (size_t)(layer * 2 * num_kv_heads + kv_head) * block_size * head_dim;
    const size_t v_offset = k_offset + (size_t)num_kv_heads * block_size * head_dim;

    const float* q_head = q ? q + ((size_t)token * num_q_heads + head) * head_dim : nullptr;
    __shared__ float warp_max[GROUP][ATTENTION_WARPS], warp_sum_[GROUP][ATTENTION_WARPS];
    __shared__ __align__(16) float warp_acc[ATTENTION_WARPS][GROUP * 32 * MAX_DIMS_PER_LANE];
    const KeyRange keys = {kv_pool, table, block_size, block_elems, k_offset, v_offset, first_key, end_key};
    float running_max[GROUP], running_sum[GROUP];
    const int q_dim = num_q_heads * head_dim, kv_dim = num_kv_heads * head_dim;
    const bool stores_new_key = GROUP > 1 || head % (num_q_heads / num_kv_heads) == 0;
#define SPLIT_WALK(lanes)                                                                                      \
    split_walk<lanes, FUSED, GROUP>(q_head, fused, keys, position, q_dim, kv_dim, head, kv_head, stores_new_key, \
                                    scale, warp_acc[warp], running_max, running_sum)
    if constexpr (GROUP > 1) {
        SPLIT_WALK(16);  // the backend takes attention_decode_grouped for head_dim 128 only
    } else {
        switch (head_dim) {
            case 128: SPLIT_WALK(16); break;
            case 64: SPLIT_WALK(8); break;
            case 256: SPLIT_WALK(32); break;
            case 32: SPLIT_WALK(4); break;
            case 16: SPLIT_WALK(2); break;
            default:  // never FUSED: the backend takes attention_decode_fused only for the head sizes above
                wait_for_previous_grid();
                attend_keys_scalar(q_head, scale, head_dim, keys, warp_acc[warp], running_max[0], running_sum[0]);
        }
    }
#undef SPLIT_WALK
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            warp_max[h][warp] = running_max[h];
            warp_sum_[h][warp] = running_sum[h];
        }
    }
    __syncthreads();
    float block_max[GROUP], total[GROUP];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        block_max[h] = NEG_INFINITY;
        for (int w = 0; w < ATTENTION_WARPS; ++w) block_max[h] = fmaxf(block_max[h], warp_max[h][w]);
        total[h] = 0.0f;
        for (int w = 0; w < ATTENTION_WARPS; ++w)
            if (warp_sum_[h][w] > 0.0f) total[h] += warp_sum_[h][w] * expf(warp_max[h][w] - block_max[h]);
    }
    // values[h] without indexing a register array by a run-time value (which would put it in local memory).
    auto of_head = [](const float (&values)[GROUP], int h) {
        float value = values[0];
#pragma unroll
        for (int g = 1; g < GROUP; ++g)
            if (h == g) value = values[g];
        return value;
    };
    // Value d of the block's GROUP rows (head d / head_dim), unnormalized.
    auto block_value = [&](int d) {
        const int h = GROUP == 1 ? 0 : d / head_dim;
        const float head_max = of_head(block_max, h);
        float value = 0.0f;
        for (int w = 0; w < ATTENTION_WARPS; ++w)
            if (warp_sum_[h][w] > 0.0f) value += warp_acc[w][d] * expf(warp_max[h][w] - head_max);
        return value;
    };
    const size_t pair = (size_t)token * num_q_heads + head;
    if (num_splits == 1 && split_counters) {
        for (int d = threadIdx.x; d < GROUP * head_dim; d += blockDim.x)
            out[pair * head_dim + d] = f2bf(block_value(d) / of_head(total, GROUP == 1 ? 0 : d / head_dim));
        return;
    }
    // Head h's split lies at slot (pair + h) * num_splits + split.
    for (int d = threadIdx.x; d < GROUP * head_dim; d += blockDim.x) {
        const int h = GROUP == 1 ? 0 : d / head_dim;
        partial_out[((pair + h) * num_splits + split) * head_dim + d - h * head_dim] = block_value(d);
    }
    if (threadIdx.x < GROUP) {
        const size_t slot = (pair + threadIdx.x) * num_splits + split;
        partial_max_sum[2 * slot] = of_head(block_max, threadIdx.x);
        partial_max_sum[2 * slot + 1] = of_head(total, threadIdx.x);
    }
    if (!split_counters) return;  // attention_combine merges

    // Publish this split, then let the last one to arrive merge them all.
    __shared__ bool merges;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned arrived = atomicAdd(&split_counters[pair], 1u);
        merges = arrived == (unsigned)num_splits - 1;
        if (merges) split_counters[pair] = 0;
    }
    __syncthreads();
    if (!merges) return;
    __threadfence();
    merge_splits<GROUP>(partial_out, partial_max_sum, pair * num_splits, num_splits, head_dim,
                        out + pair * head_dim);
}

extern "C" __global__ void attention_partial_merged(const float* q, const bf16_t* kv_pool,
                                                    const unsigned* block_tables, const unsigned* token_meta,
                                                    float* partial_out, float* partial_max_sum,
                                                    unsigned* split_counters, bf16_t* out, int num_q_heads,
                                                    int num_kv_heads, int head_dim, int layer, int block_size,
                                                    size_t block_elems, float scale) {
    attention_split<false, 1>(q, kv_pool, block_tables, token_meta, partial_out, partial_max_sum, split_counters, out,
                              num_q_heads, num_kv_heads, head_dim, layer, block_size, block_elems, scale, FusedQkv{});
}

// attention_partial_merged for decode steps (one token per sequence) that also does qk_norm_rope_store's work:
// each block makes its q from the qkv projection, and the block holding the new key stores its K and V; the
// K and V of earlier keys are loaded before the wait for the previous kernel. head_dim is 16, 32, 64, 128 or 256.
#define ATTENTION_DECODE_ENTRY(name, GROUP, BOUNDS)                                                             \
    extern "C" __global__ void BOUNDS name(                                                                     \
        const float* qkv, const float* q_norm, const float* k_norm, const float* inv_freq, float eps,           \
        bf16_t* kv_pool, const unsigned* block_tables, const unsigned* token_meta, float* partial_out,          \
        float* partial_max_sum, unsigned* split_counters, bf16_t* out, int num_q_heads, int num_kv_heads,       \
        int head_dim, int layer, int block_size, size_t block_elems, float scale) {                             \
        const FusedQkv fused = {qkv, q_norm, k_norm, inv_freq, eps};                                            \
        attention_split<true, GROUP>(nullptr, kv_pool, block_tables, token_meta, partial_out, partial_max_sum,  \
                                     split_counters, out, num_q_heads, num_kv_heads, head_dim, layer,           \
                                     block_size, block_elems, scale, fused);                                    \
    }

ATTENTION_DECODE_ENTRY(attention_decode_fused, 1, )
// Block (token, kv_head, split) does both q heads of its KV head (head_dim 128, two q heads per KV head): each
// key is read once for the group, half the blocks (all resident beside the qkv GEMV, so their first keys load
// while it runs), and the q and new-key norms share one barrier round. At most 128 registers, so that two of
// its blocks sit beside two of the qkv GEMV's on a multiprocessor.
ATTENTION_DECODE_ENTRY(attention_decode_grouped, MAX_ATTENTION_GROUP, __launch_bounds__(ATTENTION_WARPS * 32, 4))

// The same splits for steps of more than two tokens: every split writes its unnormalized output with its
// running max and sum, and attention_combine merges them.
extern "C" __global__ void attention_partial(const float* q, const bf16_t* kv_pool, const unsigned* block_tables,
                                             const unsigned* token_meta, float* partial_out, float* partial_max_sum,
                                             int num_q_heads, int num_kv_heads, int head_dim, int layer,
                                             int block_size, size_t block_elems, float scale) {
    attention_split<false, 1>(q, kv_pool, block_tables, token_meta, partial_out, partial_max_sum, nullptr, nullptr,
                              num_q_heads, num_kv_heads, head_dim, layer, block_size, block_elems, scale, FusedQkv{});
}

// Merges the splits of each (token, q_head) and writes the normalized output in bf16 for o_proj.
extern "C" __global__ void attention_combine(const float* partial_out, const float* partial_max_sum, bf16_t* out,
                                             int num_q_heads, int head_dim, int num_splits) {
    allow_next_grid();
    wait_for_previous_grid();
    const int token = blockIdx.x, head = blockIdx.y;
    const size_t first = ((size_t)token * num_q_heads + head) * num_splits;
    float global_max = NEG_INFINITY;
    for (int s = 0; s < num_splits; ++s)
        if (partial_max_sum[2 * (first + s) + 1] > 0.0f) global_max = fmaxf(global_max, partial_max_sum[2 * (first + s)]);
    float total = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
        const float sum = partial_max_sum[2 * (first + s) + 1];
        if (sum > 0.0f) total += sum * expf(partial_max_sum[2 * (first + s)] - global_max);
    }
    const float inverse_total = 1.0f / total;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float value = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float sum = partial_max_sum[2 * (first + s) + 1];
            if (sum > 0.0f) value += partial_out[(first + s) * head_dim + d] * expf(partial_max_sum[2 * (first + s)] - global_max);
        }
        out[((size_t)token * num_q_heads + head) * head_dim + d] = f2bf(value * inverse_total);
    }
}

// out[t, i] = silu(g) * u for g, u = gate_up[t, i], gate_up[t, intermediate + i]. grid: (x over the
// intermediate size, four values a thread; y over tokens, striding past 65535): no index division per value,
// and 16-byte loads when the intermediate size is a multiple of four.
extern "C" __global__ void swiglu(const float* gate_up, bf16_t* out, int intermediate, int num_tokens) {
    const int first = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (first >= intermediate) return;
    for (int token = blockIdx.y; token < num_tokens; token += gridDim.y) {
        const float* gate = gate_up + (size_t)token * 2 * intermediate;
        const float* up = gate + intermediate;
        bf16_t* o = out + (size_t)token * intermediate;
        if ((intermediate & 3) == 0) {
            const float4 g = *reinterpret_cast<const float4*>(gate + first);
            const float4 u = *reinterpret_cast<const float4*>(up + first);
            *reinterpret_cast<uint2*>(o + first) =
                make_uint2((unsigned)f2bf(g.x / (1.0f + expf(-g.x)) * u.x) | ((unsigned)f2bf(g.y / (1.0f + expf(-g.y)) * u.y) << 16),
                           (unsigned)f2bf(g.z / (1.0f + expf(-g.z)) * u.z) | ((unsigned)f2bf(g.w / (1.0f + expf(-g.w)) * u.w) << 16));
        } else {
            for (int i = first; i < min(first + 4, intermediate); ++i) o[i] = f2bf(gate[i] / (1.0f + expf(-gate[i])) * up[i]);
        }
    }
}

// tokens[r] = argmax of logits row r (the lowest index among equal maxima).
extern "C" __global__ void argmax_rows(const float* logits, unsigned* tokens, int vocab_size) {
    __shared__ float best_values[1024];
    __shared__ unsigned best_indices[1024];
    const float* row = logits + (size_t)blockIdx.x * vocab_size;
    float best = NEG_INFINITY;
    unsigned best_index = 0xffffffffu;
    // Each thread visits its indices in increasing order, so `>` keeps the lowest among its equal maxima.
    // Rows of a multiple of 4 floats go as 16-byte loads, 4 in flight per thread (one block per row walks the
    // whole vocabulary, so it is bound by how many loads are in flight, not by bandwidth).
    if ((vocab_size & 3) == 0) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const int quads = vocab_size >> 2, stride = blockDim.x;
        for (int base = threadIdx.x; base < quads; base += 4 * stride) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (base + u * stride < quads) v[u] = row4[base + u * stride];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (base + u * stride >= quads) continue;
                const unsigned i = 4u * (base + u * stride);
                const float values[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    if (values[c] > best || best_index == 0xffffffffu) {
                        best = values[c];
                        best_index = i + c;
                    }
            }
        }
    } else {
        for (int i = threadIdx.x; i < vocab_size; i += blockDim.x) {
            const float v = row[i];
            if (v > best || best_index == 0xffffffffu) {
                best = v;
                best_index = i;
            }
        }
    }
    best_values[threadIdx.x] = best;
    best_indices[threadIdx.x] = best_index;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float other = best_values[threadIdx.x + stride];
            const unsigned other_index = best_indices[threadIdx.x + stride];
            const bool take = other_index != 0xffffffffu &&
                              (best_indices[threadIdx.x] == 0xffffffffu || other > best_values[threadIdx.x] ||
                               (other == best_values[threadIdx.x] && other_index < best_indices[threadIdx.x]));
            if (take) {
                best_values[threadIdx.x] = other;
                best_indices[threadIdx.x] = other_index;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) tokens[blockIdx.x] = best_indices[0];
}

// ---- Prefill attention on the tensor cores ----
// Block (tile, q_head): up to PREFILL_TILE_Q consecutive query tokens of one sequence (tiles[2 * tile] = first
// token row, tiles[2 * tile + 1] = count), 4 warps of 16 queries each, FlashAttention-2's scheme: S = Q·Kᵀ and
// O += P·V as bf16 mma.sync m16n8k16 with f32 accumulators and an online softmax per query row. Keys stream
// through shared memory PREFILL_TILE_K at a time from the paged cache with cp.async (16 bytes a thread, two
// stages: the next tile loads while this one computes); the K and V fragments come from ldmatrix (V transposed
// by ldmatrix.trans), rows padded so its eight row addresses fall in different banks. Q's fragments stay in
// registers for the whole walk. head_dim is a multiple of 16, at most 128. Tiles run last first: the causal
// walk of a later tile is longer, so the long ones start in the first wave.
#define PREFILL_TILE_Q 64
#define PREFILL_TILE_K 64
#define PREFILL_MAX_DIM 128
#define PREFILL_STRIDE (PREFILL_MAX_DIM + 8)  // bf16 per shared row: 272 bytes, rows 16 bytes apart in the banks
#define PREFILL_THREADS 128
// Shared memory of prefill_attention: the Q tile, then two stages of K and V tiles.
#define PREFILL_SHARED_BYTES ((PREFILL_TILE_Q + 4 * PREFILL_TILE_K) * PREFILL_STRIDE * 2)

__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats to bf16x2 in one instruction (sm_80), rounded to nearest even as f2bf rounds: `lo` in the low
// half.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// 2^x on the special-function unit (-inf gives 0). The softmax weights it makes are rounded to bf16 for the
// tensor cores, so its 2^-22 relative error is far below what they keep.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned shared_u32(const void* pointer) {
    return (unsigned)__cvta_generic_to_shared(pointer);
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_u32(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_u32(row)));
}

// 16 bytes global -> shared without registers; `bytes` 0 fills the 16 bytes with zeros (keys past the end).
__device__ __forceinline__ void copy_16_async(void* target, const void* source, unsigned bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_u32(target)), "l"(source), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int PENDING>
__device__ __forceinline__ void copies_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

extern "C" __global__ void __launch_bounds__(PREFILL_THREADS) prefill_attention(
    const float* q, const bf16_t* kv_pool, const unsigned* block_tables, const unsigned* token_meta,
    const unsigned* tiles, bf16_t* out, int num_q_heads, int num_kv_heads, int head_dim, int layer,
    int block_size, size_t block_elems, float scale) {
    extern __shared__ __align__(16) bf16_t prefill_shared[];
    bf16_t(*q_tile)[PREFILL_STRIDE] = reinterpret_cast<bf16_t(*)[PREFILL_STRIDE]>(prefill_shared);
    // Stage s: K rows at kv_tiles[2 s], V rows at kv_tiles[2 s + 1].
    bf16_t(*kv_tiles)[PREFILL_TILE_K][PREFILL_STRIDE] =
        reinterpret_cast<bf16_t(*)[PREFILL_TILE_K][PREFILL_STRIDE]>(prefill_shared + PREFILL_TILE_Q * PREFILL_STRIDE);

    const int tile = gridDim.x - 1 - blockIdx.x, head = blockIdx.y;
    const int first_row = tiles[2 * tile], count = tiles[2 * tile + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    const int kv_head = head / (num_q_heads / num_kv_heads);
    const unsigned* table = block_tables + token_meta[2 * first_row + 1];
    const int first_position = token_meta[2 * first_row];
    const int last_position = first_position + count - 1;
    const size_t k_offset = (size_t)(layer * 2 * num_kv_heads + kv_head) * block_size * head_dim;
    const size_t v_offset = k_offset + (size_t)num_kv_heads * block_size * head_dim;
    const int dim_steps = head_dim / 16;
    const int chunks_per_key = head_dim / 8;
    // Scores in base 2 (log2(e) folded into the scale), so each exponential is one exp2_approx.
    const float scale_log2 = scale * 1.4426950408889634f;

    // Starts the copy of keys key_start.. into stage `stage`; keys past last_position become zeros.
    auto load_tile = [&](int key_start, int stage) {
        for (int index = threadIdx.x; index < PREFILL_TILE_K * chunks_per_key; index += PREFILL_THREADS) {
            const int j = index / chunks_per_key, d = (index % chunks_per_key) * 8;
            const int key = key_start + j;
            const bool inside = key <= last_position;
            const size_t base = inside ? (size_t)table[key / block_size] * block_elems +
                                             (size_t)(key % block_size) * head_dim + d
                                       : 0;
            copy_16_async(&kv_tiles[2 * stage][j][d], kv_pool + base + k_offset, inside ? 16 : 0);
            copy_16_async(&kv_tiles[2 * stage + 1][j][d], kv_pool + base + v_offset, inside ? 16 : 0);
        }
        copies_commit();
    };
    load_tile(0, 0);

    // Q tile to bf16; rows past `count` repeat the last query (finite, never written out).
    for (int index = threadIdx.x; index < PREFILL_TILE_Q * head_dim / 4; index += PREFILL_THREADS) {
        const int row = index / (head_dim / 4), d = (index % (head_dim / 4)) * 4;
        const int token = first_row + min(row, count - 1);
        const float4 value = *reinterpret_cast<const float4*>(q + ((size_t)token * num_q_heads + head) * head_dim + d);
        *reinterpret_cast<uint2*>(&q_tile[row][d]) = make_uint2(pack_bf16x2(value.x, value.y), pack_bf16x2(value.z, value.w));
    }
    __syncthreads();
    // This warp's Q fragments (rows warp * 16.., A layout of m16n8k16), one per 16 dims.
    unsigned q_frag[PREFILL_MAX_DIM / 16][4];
#pragma unroll
    for (int step = 0; step < PREFILL_MAX_DIM / 16; ++step)
        if (step < dim_steps) ldmatrix_x4(q_frag[step], &q_tile[warp * 16 + (lane & 15)][step * 16 + (lane >> 4) * 8]);

    // This thread's two query rows (group, group + 8 of its warp's 16) and their positions.
    const int row_a = warp * 16 + group, row_b = row_a + 8;
    const int position_a = first_position + min(row_a, count - 1);
    const int position_b = first_position + min(row_b, count - 1);
    const int warp_first_position = first_position + min(warp * 16, count - 1);
    const int warp_last_position = first_position + min(warp * 16 + 15, count - 1);

    float o[PREFILL_MAX_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < PREFILL_MAX_DIM / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float max_a = NEG_INFINITY, max_b = NEG_INFINITY, sum_a = 0.0f, sum_b = 0.0f;

    // ldmatrix row addresses: K as B (keys are B's columns, dims contiguous), V as B through .trans.
    const int matrix = lane >> 3, matrix_row = lane & 7;
    for (int key_start = 0, stage = 0; key_start <= last_position; key_start += PREFILL_TILE_K, stage ^= 1) {
        if (key_start + PREFILL_TILE_K <= last_position) {
            load_tile(key_start + PREFILL_TILE_K, stage ^ 1);
            copies_wait<1>();
        } else {
            copies_wait<0>();
        }
        __syncthreads();
        const bf16_t(*k_tile)[PREFILL_STRIDE] = kv_tiles[2 * stage];
        const bf16_t(*v_tile)[PREFILL_STRIDE] = kv_tiles[2 * stage + 1];

        // A warp whose queries all precede the tile has nothing to add from it.
        if (key_start <= warp_last_position) {
            // S = Q Kᵀ for this warp's 16 rows and the tile's keys: n-tiles of 8 keys, taken two at a time.
            float s[PREFILL_TILE_K / 8][4];
#pragma unroll
            for (int n = 0; n < PREFILL_TILE_K / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int step = 0; step < PREFILL_MAX_DIM / 16; ++step) {
                if (step < dim_steps) {
#pragma unroll
                    for (int n = 0; n < PREFILL_TILE_K / 8; n += 2) {
                        unsigned b[4];
                        ldmatrix_x4(b, &k_tile[(n + (matrix >> 1)) * 8 + matrix_row][step * 16 + (matrix & 1) * 8]);
                        mma_bf16_16816(s[n], q_frag[step], b);
                        mma_bf16_16816(s[n + 1], q_frag[step], b + 2);
                    }
                }
            }

            // Scale, causal mask (only a tile reaching past the warp's first query needs one), online softmax
            // over the rows a (c0, c1) and b (c2, c3).
            float tile_max_a = NEG_INFINITY, tile_max_b = NEG_INFINITY;
            if (key_start + PREFILL_TILE_K - 1 <= warp_first_position) {
#pragma unroll
                for (int n = 0; n < PREFILL_TILE_K / 8; ++n) {
#pragma unroll
                    for (int c = 0; c < 4; ++c) s[n][c] *= scale_log2;
                    tile_max_a = fmaxf(tile_max_a, fmaxf(s[n][0], s[n][1]));
                    tile_max_b = fmaxf(tile_max_b, fmaxf(s[n][2], s[n][3]));
                }
            } else {
#pragma unroll
                for (int n = 0; n < PREFILL_TILE_K / 8; ++n) {
                    const int key = key_start + n * 8 + 2 * quad;
                    s[n][0] = key <= position_a ? s[n][0] * scale_log2 : NEG_INFINITY;
                    s[n][1] = key + 1 <= position_a ? s[n][1] * scale_log2 : NEG_INFINITY;
                    s[n][2] = key <= position_b ? s[n][2] * scale_log2 : NEG_INFINITY;
                    s[n][3] = key + 1 <= position_b ? s[n][3] * scale_log2 : NEG_INFINITY;
                    tile_max_a = fmaxf(tile_max_a, fmaxf(s[n][0], s[n][1]));
                    tile_max_b = fmaxf(tile_max_b, fmaxf(s[n][2], s[n][3]));
                }
            }
            for (int offset = 1; offset < 4; offset <<= 1) {
                tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(0xffffffffu, tile_max_a, offset));
                tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(0xffffffffu, tile_max_b, offset));
            }
            // Key 0 is visible to every query, so after the first tile every row's max is finite.
            const float new_max_a = fmaxf(max_a, tile_max_a), new_max_b = fmaxf(max_b, tile_max_b);
            const float correction_a = exp2_approx(max_a - new_max_a), correction_b = exp2_approx(max_b - new_max_b);
            max_a = new_max_a;
            max_b = new_max_b;
            float tile_sum_a = 0.0f, tile_sum_b = 0.0f;
#pragma unroll
            for (int n = 0; n < PREFILL_TILE_K / 8; ++n) {
                s[n][0] = exp2_approx(s[n][0] - max_a);
                s[n][1] = exp2_approx(s[n][1] - max_a);
                s[n][2] = exp2_approx(s[n][2] - max_b);
                s[n][3] = exp2_approx(s[n][3] - max_b);
                tile_sum_a += s[n][0] + s[n][1];
                tile_sum_b += s[n][2] + s[n][3];
            }
            sum_a = sum_a * correction_a + tile_sum_a;  // per-thread partial sums, reduced over the quad at the end
            sum_b = sum_b * correction_b + tile_sum_b;
#pragma unroll
            for (int n = 0; n < PREFILL_MAX_DIM / 8; ++n) {
                o[n][0] *= correction_a;
                o[n][1] *= correction_a;
                o[n][2] *= correction_b;
                o[n][3] *= correction_b;
            }

            // O += P V: P's accumulator layout is the A layout of the next product, two key n-tiles per k16
            // step; V's fragments for two 8-dim n-tiles per ldmatrix.
#pragma unroll
            for (int kstep = 0; kstep < PREFILL_TILE_K / 16; ++kstep) {
                unsigned a[4];
                a[0] = pack_bf16x2(s[2 * kstep][0], s[2 * kstep][1]);
                a[1] = pack_bf16x2(s[2 * kstep][2], s[2 * kstep][3]);
                a[2] = pack_bf16x2(s[2 * kstep + 1][0], s[2 * kstep + 1][1]);
                a[3] = pack_bf16x2(s[2 * kstep + 1][2], s[2 * kstep + 1][3]);
#pragma unroll
                for (int n = 0; n < PREFILL_MAX_DIM / 8; n += 2) {
                    if (n < head_dim / 8) {
                        unsigned b[4];
                        ldmatrix_x4_trans(b, &v_tile[kstep * 16 + (matrix & 1) * 8 + matrix_row][(n + (matrix >> 1)) * 8]);
                        mma_bf16_16816(o[n], a, b);
                        mma_bf16_16816(o[n + 1], a, b + 2);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before the next iteration refills it
    }

    for (int offset = 1; offset < 4; offset <<= 1) {
        sum_a += __shfl_xor_sync(0xffffffffu, sum_a, offset);
        sum_b += __shfl_xor_sync(0xffffffffu, sum_b, offset);
    }
    const float inverse_a = 1.0f / sum_a, inverse_b = 1.0f / sum_b;
#pragma unroll
    for (int n = 0; n < PREFILL_MAX_DIM / 8; ++n) {
        if (n < head_dim / 8) {
            const int d = n * 8 + 2 * quad;
            if (row_a < count)
                *reinterpret_cast<unsigned*>(out + ((size_t)(first_row + row_a) * num_q_heads + head) * head_dim + d) =
                    pack_bf16x2(o[n][0] * inverse_a, o[n][1] * inverse_a);
            if (row_b < count)
                *reinterpret_cast<unsigned*>(out + ((size_t)(first_row + row_b) * num_q_heads + head) * head_dim + d) =
                    pack_bf16x2(o[n][2] * inverse_b, o[n][3] * inverse_b);
        }
    }
}

// KV blocks to and from the f32 layout of KV_LAYOUT.md, on the GPU, so a block crosses to the host as one copy.
extern "C" __global__ void bf16_to_f32(const bf16_t* src, float* dst, size_t count) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = bf2f(src[i]);
}

extern "C" __global__ void f32_to_bf16(const float* src, bf16_t* dst, size_t count) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = f2bf(src[i]);
}

// One layer's part of `num_blocks` pool blocks to and from a contiguous f32 chunk (the KV transfer's layer
// payload): chunk block b is pool block block_ids[b], from element `layer_offset` for `layer_elems` elements,
// ordered [k, v][kv_head][slot][dim]. Gathering zeroes the slots of the last block from `last_used_slots`
// on, so nothing past the sequence leaves the GPU. grid: (x over the layer's elements, y = chunk block).
extern "C" __global__ void gather_layer_f32(const bf16_t* kv_pool, const unsigned* block_ids, float* chunk,
                                            size_t block_elems, size_t layer_offset, int layer_elems,
                                            int head_dim, int block_size, int last_used_slots) {
    const int b = blockIdx.y;
    const bool last = b == (int)gridDim.y - 1;
    const bf16_t* src = kv_pool + (size_t)block_ids[b] * block_elems + layer_offset;
    float* dst = chunk + (size_t)b * layer_elems;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < layer_elems; i += gridDim.x * blockDim.x) {
        const int slot = (i / head_dim) % block_size;
        dst[i] = (last && slot >= last_used_slots) ? 0.0f : bf2f(src[i]);
    }
}

extern "C" __global__ void scatter_layer_f32(const float* chunk, const unsigned* block_ids, bf16_t* kv_pool,
                                             size_t block_elems, size_t layer_offset, int layer_elems) {
    const int b = blockIdx.y;
    bf16_t* dst = kv_pool + (size_t)block_ids[b] * block_elems + layer_offset;
    const float* src = chunk + (size_t)b * layer_elems;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < layer_elems; i += gridDim.x * blockDim.x)
        dst[i] = f2bf(src[i]);
}
