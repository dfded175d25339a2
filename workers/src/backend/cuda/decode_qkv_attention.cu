// A decode step of one sequence: each layer's qkv projection and its attention in one launch, a thread block
// cluster per KV head (sm_90), so the hand-off between them is two cluster barriers instead of a kernel
// boundary, a trip through L2 and a split merge behind a global counter. Shapes: head_dim 128, two q heads per
// KV head, a hidden size of at most 1024 in whole 256-wide parts (Qwen3-0.6B); the backend checks them.
//
// Block `rank` of KV head h's cluster of QKVA_CLUSTER blocks:
//   1. before the wait for the previous kernel: its QKVA_ROWS rows of the KV head's [q0; q1; k; v] rows of the
//      qkv weight and the input norm's weights into shared memory (cp.async), RoPE's cosine and sine, and the
//      K and V of the first keys of its split of the context (split `rank`);
//   2. RMSNorm of the hidden state, each warp on its own (a warp's lanes hold every value of it, so no block
//      barrier), then its rows' dot products; every block gets every value of the KV head's q, k and v through
//      distributed shared memory, then the cluster barrier;
//   3. q/k norms and RoPE (the block holding the new key stores its K and V in the cache), its split of the
//      attention (attend_keys_vec), then each block sends every other block its split's maxima and sums and
//      the part of its unnormalized output that block merges; after the second cluster barrier each block
//      writes QKVA_DIMS_PER_BLOCK dims of the KV head's two q heads' outputs, in bf16, for o_proj.
// Sixteen blocks a cluster, two allowed on a multiprocessor: an H100 SXM holds only seven clusters of ten to
// sixteen blocks at one a multiprocessor (one of its GPCs is smaller), so the eighth KV head's cluster shares
// multiprocessors. Clusters of nine at one a multiprocessor, or of eight, measured slower (PERF.md).

#define QKVA_CLUSTER 16
#define QKVA_WARPS 8
#define QKVA_THREADS (QKVA_WARPS * 32)
#define QKVA_HEAD_DIM 128
#define QKVA_GROUP 2
#define QKVA_KV_ROWS ((QKVA_GROUP + 2) * QKVA_HEAD_DIM)      // a KV head's rows of the qkv weight: 512
#define QKVA_ROWS (QKVA_KV_ROWS / QKVA_CLUSTER)                // a block's: 32
#define QKVA_ROWS_PER_WARP (QKVA_ROWS / QKVA_WARPS)             // 4
// 16-byte chunks of a row a lane holds: a hidden size of at most 1024.
#define QKVA_CHUNKS 4
#define QKVA_DIMS_PER_BLOCK (QKVA_GROUP * QKVA_HEAD_DIM / QKVA_CLUSTER)  // 16
// Dynamic shared memory of a block: its QKVA_ROWS rows of up to 32 * 8 * QKVA_CHUNKS bf16 (64 KiB).
#define QKVA_SHARED_BYTES (QKVA_ROWS * 32 * QKVA_CHUNKS * 16)

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}

// The address in the shared memory of the cluster's block `rank` of what `local` is in this block's.
__device__ __forceinline__ unsigned cluster_address(const void* local, unsigned rank) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_u32(local)), "r"(rank));
    return remote;
}

__device__ __forceinline__ void cluster_store(unsigned address, float value) {
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(address), "f"(value) : "memory");
}

__device__ __forceinline__ void cluster_store2(unsigned address, float first, float second) {
    asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};" ::"r"(address), "f"(first), "f"(second) : "memory");
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// Every block's shared-memory stores before it are seen by every block after it.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
#endif

// At most 128 registers, so that two blocks fit a multiprocessor (see above).
extern "C" __global__ void __launch_bounds__(QKVA_THREADS, 2) decode_qkv_attention(
    const bf16_t* w_qkv, int hidden_size, const float* hidden, const float* input_norm, float eps,
    const float* q_norm, const float* k_norm, const float* inv_freq, bf16_t* kv_pool, const unsigned* block_tables,
    const unsigned* token_meta, bf16_t* out, int num_q_heads, int num_kv_heads, int head_dim, int layer,
    int block_size, size_t block_elems, float scale) {
#if __CUDA_ARCH__ >= 900
    constexpr int D = QKVA_HEAD_DIM, HALF = D / 2, LANES_PER_KEY = D / 8;
    constexpr int KEYS_PER_STEP = 32 / LANES_PER_KEY * ATTENTION_LOADS;
    extern __shared__ __align__(16) uint4 weight_tile[];  // QKVA_SHARED_BYTES: the block's rows, see below
    __shared__ __align__(16) float norm_weight[32 * 8 * QKVA_CHUNKS];
    __shared__ __align__(16) float qkv_made[QKVA_KV_ROWS];  // the KV head's q0, q1, k, v before their norms
    __shared__ __align__(16) float q_made[QKVA_GROUP * D];
    __shared__ __align__(16) bf16_t new_k[D], new_v[D];
    __shared__ float part_squares[QKVA_WARPS];
    __shared__ __align__(16) float warp_acc[QKVA_WARPS][QKVA_GROUP * D];
    __shared__ float warp_max[QKVA_GROUP][QKVA_WARPS], warp_total[QKVA_GROUP][QKVA_WARPS];
    // What the cluster's blocks send this one: split s's unnormalized values of this block's dims, and its
    // maximum and sum of the head those dims belong to.
    __shared__ float merge_value[QKVA_CLUSTER][QKVA_DIMS_PER_BLOCK];
    __shared__ __align__(8) float2 merge_max_sum[QKVA_CLUSTER];

    cluster_arrive_relaxed();  // this block has started: the others may write its shared memory
    allow_next_grid();
    const unsigned rank = cluster_rank();
    const int kv_head = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q_dim = num_q_heads * D, kv_dim = num_kv_heads * D;
    const int chunks = hidden_size >> 3;

    // This warp's rows: local row R of the KV head (q0, q1, k, v, D rows each) is a row of the qkv weight.
    // Each lane copies the chunks it multiplies into shared memory (weight_tile[warp][j][u][lane]), so no
    // register holds them while the previous kernel ends and no barrier is needed before they are read.
    const int first_row = (int)rank * QKVA_ROWS + warp * QKVA_ROWS_PER_WARP;
    uint4* warp_tile = weight_tile + (size_t)warp * QKVA_ROWS_PER_WARP * QKVA_CHUNKS * 32;
#pragma unroll
    for (int j = 0; j < QKVA_ROWS_PER_WARP; ++j) {
        const int local = first_row + j;
        const int row = local < QKVA_GROUP * D ? kv_head * QKVA_GROUP * D + local
                        : local < (QKVA_GROUP + 1) * D ? q_dim + kv_head * D + local - QKVA_GROUP * D
                                                        : q_dim + kv_dim + kv_head * D + local - (QKVA_GROUP + 1) * D;
        const uint4* weight_row = reinterpret_cast<const uint4*>(w_qkv + (size_t)row * hidden_size);
#pragma unroll
        for (int u = 0; u < QKVA_CHUNKS; ++u) {
            const int c = lane + 32 * u;
            if (c < chunks) copy_16_async(&warp_tile[(j * QKVA_CHUNKS + u) * 32 + lane], weight_row + c, 16);
        }
    }
    for (int i = threadIdx.x; i < (hidden_size >> 2); i += QKVA_THREADS)
        copy_16_async(&norm_weight[4 * i], input_norm + 4 * i, 16);
    copies_commit();

    // The step's metadata is uploaded before its first kernel; only the new key is written by this step.
    const unsigned position = token_meta[0];
    const unsigned* table = block_tables + token_meta[1];
    const int keys_per_split = ((int)position + QKVA_CLUSTER) / QKVA_CLUSTER;
    const int first_key = (int)rank * keys_per_split;
    const int end_key = min((int)position + 1, first_key + keys_per_split);
    const size_t k_offset = (size_t)(layer * 2 * num_kv_heads + kv_head) * block_size * D;
    const size_t v_offset = k_offset + (size_t)num_kv_heads * block_size * D;
    const KeyRange keys = {kv_pool, table, block_size, block_elems, k_offset, v_offset, first_key, end_key};
    const int new_key = (int)position;
    const int first_base = first_key + warp * KEYS_PER_STEP;
    uint4 k_rows[ATTENTION_LOADS], v_rows[ATTENTION_LOADS];
    if (first_base < end_key) load_key_rows<LANES_PER_KEY>(keys, first_base, new_key, nullptr, nullptr, k_rows, v_rows);
    // Thread t holds pair t % HALF of part t / HALF: q0, q1, k, v.
    const int part = threadIdx.x / HALF, i = threadIdx.x % HALF;
    const RopePair rope = rope_pair(q_norm, k_norm, inv_freq, position, D, i);
    const bool holds_new_key = first_key <= new_key && new_key < end_key;
    bf16_t* new_slot = nullptr;
    if (holds_new_key)
        new_slot = kv_pool + (size_t)table[new_key / block_size] * block_elems + (size_t)(new_key % block_size) * D;
    wait_for_previous_grid();

    // RMSNorm(hidden) as the other decode paths round it (bf16), each lane holding chunks lane + 32u.
    float4 values[QKVA_CHUNKS][2];
    const float4* hidden_quads = reinterpret_cast<const float4*>(hidden);
    float sum_squares = 0.0f;
#pragma unroll
    for (int u = 0; u < QKVA_CHUNKS; ++u) {
        const int c = lane + 32 * u;
        values[u][0] = values[u][1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (c < chunks) {
            values[u][0] = hidden_quads[2 * c];
            values[u][1] = hidden_quads[2 * c + 1];
        }
    }
#pragma unroll
    for (int u = 0; u < QKVA_CHUNKS; ++u) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float4 v = values[u][half];
            sum_squares += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    }
    const float inverse_rms = 1.0f / sqrtf(warp_sum(sum_squares) / hidden_size + eps);
    copies_wait<0>();
    __syncthreads();  // norm_weight (each lane reads only the weight chunks it copied itself)

    float acc[QKVA_ROWS_PER_WARP];
#pragma unroll
    for (int j = 0; j < QKVA_ROWS_PER_WARP; ++j) acc[j] = 0.0f;
#pragma unroll
    for (int u = 0; u < QKVA_CHUNKS; ++u) {
        const int c = lane + 32 * u;
        if (c >= chunks) continue;
        const float4 g0 = *reinterpret_cast<const float4*>(&norm_weight[8 * c]);
        const float4 g1 = *reinterpret_cast<const float4*>(&norm_weight[8 * c + 4]);
        const float4 v0 = values[u][0], v1 = values[u][1];
        const float x[8] = {
            bf2f(f2bf(g0.x * (v0.x * inverse_rms))), bf2f(f2bf(g0.y * (v0.y * inverse_rms))),
            bf2f(f2bf(g0.z * (v0.z * inverse_rms))), bf2f(f2bf(g0.w * (v0.w * inverse_rms))),
            bf2f(f2bf(g1.x * (v1.x * inverse_rms))), bf2f(f2bf(g1.y * (v1.y * inverse_rms))),
            bf2f(f2bf(g1.z * (v1.z * inverse_rms))), bf2f(f2bf(g1.w * (v1.w * inverse_rms)))};
#pragma unroll
        for (int j = 0; j < QKVA_ROWS_PER_WARP; ++j) {
            const uint4 weight = warp_tile[(j * QKVA_CHUNKS + u) * 32 + lane];
            const unsigned words[4] = {weight.x, weight.y, weight.z, weight.w};
            float sum = acc[j];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                sum = fmaf(__uint_as_float(words[e] << 16), x[2 * e], sum);
                sum = fmaf(__uint_as_float(words[e] & 0xffff0000u), x[2 * e + 1], sum);
            }
            acc[j] = sum;
        }
    }
#pragma unroll
    for (int j = 0; j < QKVA_ROWS_PER_WARP; ++j) acc[j] = warp_sum(acc[j]);

    // Rows first_row + 2p, + 2p + 1 to block `lane % QKVA_CLUSTER`'s qkv_made, by lane (p = lane /
    // QKVA_CLUSTER): every lane stores two values, so the warp's rows reach every block at once.
    static_assert(QKVA_ROWS_PER_WARP / 2 * QKVA_CLUSTER == 32, "a lane sends one pair of rows to one block");
    cluster_wait();  // every block has started
    {
        const int pair = lane / QKVA_CLUSTER;
        float first = acc[0], second = acc[1];
#pragma unroll
        for (int p = 1; p < QKVA_ROWS_PER_WARP / 2; ++p) {
            if (pair == p) {
                first = acc[2 * p];
                second = acc[2 * p + 1];
            }
        }
        cluster_store2(cluster_address(&qkv_made[first_row + 2 * pair], lane % QKVA_CLUSTER), first, second);
    }
    cluster_sync();

    // q/k norms and RoPE, one barrier round: warps 2p and 2p + 1 hold part p.
    const float x1 = qkv_made[part * D + i], x2 = qkv_made[part * D + i + HALF];
    const float part_sum = warp_sum(x1 * x1 + x2 * x2);
    if (lane == 0) part_squares[warp] = part_sum;
    __syncthreads();
    const float total_squares = part_squares[2 * part] + part_squares[2 * part + 1];
    const float norm_scale = 1.0f / sqrtf(total_squares / D + eps);
    if (part <= QKVA_GROUP) {
        const float weight1 = part < QKVA_GROUP ? rope.q_weight1 : rope.k_weight1;
        const float weight2 = part < QKVA_GROUP ? rope.q_weight2 : rope.k_weight2;
        const float2 rotated = norm_rope(x1, x2, weight1, weight2, norm_scale, rope);
        if (part < QKVA_GROUP) {
            q_made[part * D + i] = rotated.x;
            q_made[part * D + i + HALF] = rotated.y;
        } else {
            store_new_pair(new_k, new_slot, k_offset, i, HALF, rotated.x, rotated.y);
        }
    } else {
        store_new_pair(new_v, new_slot, v_offset, i, HALF, x1, x2);
    }
    __syncthreads();

    if (holds_new_key) place_new_key<LANES_PER_KEY>(first_base, new_key, new_k, new_v, k_rows, v_rows);
    float running_max[QKVA_GROUP], running_sum[QKVA_GROUP];
    attend_keys_vec<LANES_PER_KEY, QKVA_GROUP, QKVA_WARPS>(q_made, scale, keys, new_key, new_k, new_v, true, k_rows,
                                                           v_rows, warp_acc[warp], running_max, running_sum);
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < QKVA_GROUP; ++h) {
            warp_max[h][warp] = running_max[h];
            warp_total[h][warp] = running_sum[h];
        }
    }
    __syncthreads();

    // The block's split: thread t makes dim t % D of head t / D, and sends it to the block that merges it.
    {
        static_assert(QKVA_THREADS == QKVA_GROUP * D, "a thread a dim of the block's output");
        const int h = threadIdx.x / D;
        float block_max = NEG_INFINITY;
#pragma unroll
        for (int w = 0; w < QKVA_WARPS; ++w)
            if (warp_total[h][w] > 0.0f) block_max = fmaxf(block_max, warp_max[h][w]);
        float value = 0.0f, total = 0.0f;
#pragma unroll
        for (int w = 0; w < QKVA_WARPS; ++w) {
            if (!(warp_total[h][w] > 0.0f)) continue;
            const float weight = expf(warp_max[h][w] - block_max);
            value += warp_acc[w][threadIdx.x] * weight;
            total += warp_total[h][w] * weight;
        }
        const int owner = threadIdx.x / QKVA_DIMS_PER_BLOCK;
        cluster_store(cluster_address(&merge_value[rank][threadIdx.x % QKVA_DIMS_PER_BLOCK], owner), value);
        // An owner's dims lie in one head: the first thread of its dims also sends that head's maximum and sum.
        if (threadIdx.x % QKVA_DIMS_PER_BLOCK == 0)
            cluster_store2(cluster_address(&merge_max_sum[rank], owner), block_max, total);
    }
    cluster_sync();

    // Merge this block's dims over the splits: thread t takes split t % QKVA_CLUSTER of dim t / QKVA_CLUSTER,
    // and the splits of a dim (neighbouring lanes) reduce by shuffles.
    {
        static_assert(QKVA_THREADS == QKVA_CLUSTER * QKVA_DIMS_PER_BLOCK, "a thread a (split, dim)");
        const int split = threadIdx.x % QKVA_CLUSTER, dim = threadIdx.x / QKVA_CLUSTER;
        const int first_dim = (int)rank * QKVA_DIMS_PER_BLOCK;  // of the KV head's GROUP * D output values
        const float2 max_sum = merge_max_sum[split];
        const bool counts = max_sum.y > 0.0f;
        float merged_max = counts ? max_sum.x : NEG_INFINITY;
#pragma unroll
        for (int offset = QKVA_CLUSTER / 2; offset > 0; offset >>= 1)
            merged_max = fmaxf(merged_max, __shfl_xor_sync(0xffffffffu, merged_max, offset));
        const float weight = counts ? expf(max_sum.x - merged_max) : 0.0f;
        float value = counts ? merge_value[split][dim] * weight : 0.0f, total = max_sum.y * weight;
#pragma unroll
        for (int offset = QKVA_CLUSTER / 2; offset > 0; offset >>= 1) {
            value += __shfl_xor_sync(0xffffffffu, value, offset);
            total += __shfl_xor_sync(0xffffffffu, total, offset);
        }
        if (split == 0) out[(size_t)kv_head * QKVA_GROUP * D + first_dim + dim] = f2bf(value / total);
    }
#endif
}
