// Study, not part of the backend: can a persistent decode kernel run the layers of the Qwen3-0.6B shape at
// batch 1 faster than one kernel per stage (the committed decode GEMV path, 26 us a layer on the H100)?
//
// One block of 512 threads per multiprocessor walks all 28 layers, five stages each (qkv, attention, o_proj,
// gate_up + SwiGLU, down_proj; real arithmetic on random bf16 weights, the attention over a contiguous KV of
// `ctx` keys without paging, RoPE or q/k norms). The next stage's weights stream into shared memory through the
// copy engine (cp.async.bulk on an mbarrier) while the block waits for the current stage's inputs; stages hand
// over through counters in global memory (red.release / ld.acquire). Variants:
//   v0  inputs read from shared memory per row, the attention's splits merged by the last one to arrive;
//   v1  each warp's share of the input in registers, the splits merged by every o_proj block as it reads them;
//   v2  v1 with the attention's scores computed eight lanes a key, all keys at once, before the softmax;
//   v3  (mk_v3, stop 26) hand-offs through tagged values polled by the consumer (NCCL's LL protocol) instead of
//       counters, weights streamed through a ring of 16 KB pieces up to `max_ahead` stages ahead, and timing-only
//       modes without weight loads or without the attention, to measure the chain alone.
// It checks the hidden state after 28 layers against plain one-kernel-per-stage reference kernels, times each
// variant over 200 launches, traces one launch per stage with %globaltimer, and times bare barrier rounds.
//
// Build here and run on the lent GPU (see PERF.md, "A persistent kernel, measured"):
//   N=<a CUDA 13 toolkit, e.g. the nvidia-cuda-nvcc wheel's nvidia/cu13>
//   $N/bin/nvcc -O3 -arch=sm_90 -I$N/include -L$N/lib persistent_layers.cu -o persistent_layers \
//       -lcudart_static -lpthread -ldl -lrt
//   ./persistent_layers 550
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>

// The backend's kernels, for their bf16 helpers, warp_sum, dot8_bf16 and shared_u32 (their kernels are compiled
// too, and not launched here).
#include "../kernels.cu"
#include "../decode_gemv.cu"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); exit(1);} } while (0)

constexpr int H = 1024, QD = 2048, KVD = 1024, QKV = QD + 2 * KVD, I = 3072, LAYERS = 28, HD = 128, QH = 16, KVH = 8;
constexpr int THREADS = 512, WARPS = THREADS / 32;
constexpr int SPLITS = 16;  // max attention work items per kv head
constexpr int PSTRIDE = HD + 4;
constexpr int BUF_BYTES = 96 * 1024;

__device__ float block_sum(float v, float* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < WARPS ? scratch[lane] : 0.f;
    return warp_sum(t);
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_u32(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// thread 0: expect `bytes`, then copy them in pieces.
__device__ __forceinline__ void tma_expect(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    constexpr unsigned PIECE = 16384;
    for (unsigned off = 0; off < bytes; off += PIECE) {
        const unsigned size = min(PIECE, bytes - off);
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                shared_u32((char*)dst + off)),
            "l"((const char*)src + off), "r"(size), "r"(shared_u32(bar))
            : "memory");
    }
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned phase) {
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done)
                     : "r"(shared_u32(bar)), "r"(phase)
                     : "memory");
    }
}
__device__ __forceinline__ void arrive(unsigned* counter) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}
__device__ __forceinline__ void wait_count(const unsigned* counter, unsigned target) {
    if (threadIdx.x == 0) {
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
        } while (v < target);
    }
    __syncthreads();
}

struct LayerW {
    const bf16_t *qkv, *o, *gate_up, *down, *kv;  // kv: [KVH][ctx][256] (k then v per key)
    const float *norm1, *norm2;
};
struct V3 {
    unsigned long long *qkv, *attn, *hidden_o, *hidden_down, *act;  // tagged values
    unsigned* merge_counters;  // [LAYERS][KVH]: the splits of a kv head count in; the last one merges
    unsigned epoch;            // differs every launch
    int max_ahead;             // stages in the ring ahead of the current one, at most
    int mode;                  // timing only: bit 0 loads no weights (the chain alone), bit 1 attention copies q
};
struct Params {
    LayerW layers[LAYERS];
    float* hidden;       // [H]
    float* qkv_out;      // [QKV]
    bf16_t* attn_out;    // [QD]
    bf16_t* act;         // [I]
    float* partials;     // [QH][SPLITS][HD + 2]
    unsigned* counters;  // [LAYERS][8] zeroed before the launch
    int ctx;
    int splits;          // attention splits per kv head
    int variant;         // 0: smem x, last-arriver merge; 1: x in registers, merge in the o stage
    int preload;         // 1: next stage's weights stream ahead; 0: each stage loads after its wait
    unsigned long long* trace;  // [LAYERS*STAGES][nb][4] or null
    V3 v3;               // mk_v3 only
};
__device__ __forceinline__ unsigned long long gtime() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }

// Rows [r0, r0 + rows) of a stage, or for gate_up pairs.
struct Share { int r0, rows; };
__device__ __forceinline__ Share share_of(int n, int b, int nb) {
    const int per = (n + nb - 1) / nb;
    const int r0 = min(n, b * per);
    return {r0, min(n, r0 + per) - r0};
}

enum { S_QKV = 0, S_ATTN = 1, S_O = 2, S_GU = 3, S_DOWN = 4, STAGES = 5 };

__device__ void issue_load(const Params& p, int layer, int stage, void* buf, unsigned long long* bar) {
    if (threadIdx.x != 0 || layer >= LAYERS) return;
    const LayerW& w = p.layers[layer];
    const int b = blockIdx.x, nb = gridDim.x;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    if (stage == S_QKV) {
        Share s = share_of(QKV, b, nb);
        tma_expect(bar, s.rows * H * 2);
        if (s.rows) tma_copy(buf, w.qkv + (size_t)s.r0 * H, s.rows * H * 2, bar);
    } else if (stage == S_ATTN) {
        unsigned bytes = 0;
        if (b < KVH * p.splits) {
            const int kvh = b / p.splits, split = b % p.splits;
            const int per = (p.ctx + p.splits - 1) / p.splits, k0 = min(p.ctx, split * per), k1 = min(p.ctx, k0 + per);
            bytes = (k1 - k0) * 512;
            tma_expect(bar, bytes);
            if (bytes) tma_copy(buf, w.kv + ((size_t)kvh * p.ctx + k0) * 256, bytes, bar);
        } else tma_expect(bar, 0);
    } else if (stage == S_O) {
        Share s = share_of(H, b, nb);
        tma_expect(bar, s.rows * QD * 2);
        if (s.rows) tma_copy(buf, w.o + (size_t)s.r0 * QD, s.rows * QD * 2, bar);
    } else if (stage == S_GU) {
        Share s = share_of(I, b, nb);
        tma_expect(bar, 2 * s.rows * H * 2);
        if (s.rows) {
            tma_copy(buf, w.gate_up + (size_t)s.r0 * H, s.rows * H * 2, bar);
            tma_copy((char*)buf + s.rows * H * 2, w.gate_up + (size_t)(I + s.r0) * H, s.rows * H * 2, bar);
        }
    } else {
        Share s = share_of(H, b, nb);
        tma_expect(bar, s.rows * I * 2);
        if (s.rows) tma_copy(buf, w.down + (size_t)s.r0 * I, s.rows * I * 2, bar);
    }
}

// x (bf16, k wide, in smem) times `rows` smem rows of k: results to red[row] (smem floats).
__device__ void smem_gemv(const bf16_t* wbuf, const bf16_t* x, int rows, int k, float* out, float* seg_scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int chunks = k / 8;
    const int segs = rows >= WARPS ? 1 : WARPS / max(rows, 1);
    const int seg_chunks = (chunks + segs - 1) / segs;
    const uint4* xc = reinterpret_cast<const uint4*>(x);
    for (int item = warp; item < rows * segs; item += WARPS) {
        const int row = item / segs, seg = item % segs;
        const uint4* wr = reinterpret_cast<const uint4*>(wbuf + (size_t)row * k);
        const int c0 = seg * seg_chunks, c1 = min(chunks, c0 + seg_chunks);
        float s = 0.f;
        for (int c = c0 + lane; c < c1; c += 32) s += dot8_bf16(wr[c], xc[c]);
        s = warp_sum(s);
        if (lane == 0) seg_scratch[item] = s;
    }
    __syncthreads();
    for (int row = threadIdx.x; row < rows; row += THREADS) {
        float s = 0.f;
        for (int g = 0; g < segs; ++g) s += seg_scratch[row * segs + g];
        out[row] = s;
    }
    __syncthreads();
}

// A warp's dot product of one bf16 row in shared memory (its CH 16-byte chunks a lane, lane + 32 j) with x in
// registers (the same chunks, as floats).
template <int CH>
__device__ __forceinline__ float dot_row_xreg(const unsigned char* row, const float (&x)[CH][8]) {
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(row);
    uint4 wv[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) wv[j] = wr[lane + 32 * j];
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < CH; ++j) {
        const unsigned u[4] = {wv[j].x, wv[j].y, wv[j].z, wv[j].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[i] = fmaf(__uint_as_float(u[i] << 16), x[j][2 * i], acc[i]);
            acc[i] = fmaf(__uint_as_float(u[i] & 0xffff0000u), x[j][2 * i + 1], acc[i]);
        }
    }
    return warp_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}
// x (bf16, K wide, in smem) read once into registers per warp; warp w takes rows w / SEGS... with segment w % SEGS.
template <int K, int SEGS>
__device__ void gemv_xreg(const bf16_t* wbuf, const bf16_t* x, int rows, float* out, float* seg_scratch) {
    constexpr int CH = K / 8 / 32 / SEGS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, seg = warp % SEGS;
    const uint4* xc = reinterpret_cast<const uint4*>(x) + seg * (K / 8 / SEGS);
    float xf[CH][8];
#pragma unroll
    for (int j = 0; j < CH; ++j) {
        const uint4 v = xc[lane + 32 * j];
        const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) { xf[j][2 * i] = __uint_as_float(u[i] << 16); xf[j][2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u); }
    }
    for (int item = warp; item < rows * SEGS; item += WARPS) {
        const int row = item / SEGS;
        const uint4* wr = reinterpret_cast<const uint4*>(wbuf + (size_t)row * K) + seg * (K / 8 / SEGS);
        const float s = dot_row_xreg<CH>(reinterpret_cast<const unsigned char*>(wr), xf);
        if (lane == 0) seg_scratch[item] = s;
    }
    __syncthreads();
    for (int row = threadIdx.x; row < rows; row += THREADS) {
        float s = 0.f;
#pragma unroll
        for (int g = 0; g < SEGS; ++g) s += seg_scratch[row * SEGS + g];
        out[row] = s;
    }
    __syncthreads();
}

__device__ void norm_to_smem(const float* hidden, const float* weight, bf16_t* x, float* scratch) {
    float v[2];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        v[j] = __ldcg(hidden + threadIdx.x + j * THREADS);
        ss += v[j] * v[j];
    }
    const float scale = 1.f / sqrtf(block_sum(ss, scratch) / H + 1e-6f);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int i = threadIdx.x + j * THREADS;
        x[i] = f2bf(weight[i] * (v[j] * scale));
    }
    __syncthreads();
}

// One attention split for a KV head's two q heads, keys at key_at(key) (256 bf16: K then V), in three passes
// separated by block barriers: the scores, eight lanes a key (16 dims each, q0 / q1 this lane's dims, scaled), four
// keys a warp; the softmax's numerators in place with each head's max and sum (warps 0 and 1); the values, thread
// (head tid / 256, dims 2 dg and 2 dg + 1, key quarter) into part[head] (HD values, then the max and the sum).
template <typename KeyAt>
__device__ void split_scores(const float (&q0)[16], const float (&q1)[16], int nkeys, KeyAt key_at, float* scores,
                             int stride) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane >> 3, part = lane & 7;
    for (int base = warp * 4; base < nkeys; base += WARPS * 4) {
        const int key = min(base + sub, nkeys - 1);
        const uint4* kr = reinterpret_cast<const uint4*>(key_at(key) + part * 16);
        const uint4 ka = kr[0], kb = kr[1];
        const unsigned kw[8] = {ka.x, ka.y, ka.z, ka.w, kb.x, kb.y, kb.z, kb.w};
        float d0 = 0, d1 = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float lo = __uint_as_float(kw[i] << 16), hi = __uint_as_float(kw[i] & 0xffff0000u);
            d0 = fmaf(q0[2 * i], lo, d0); d0 = fmaf(q0[2 * i + 1], hi, d0);
            d1 = fmaf(q1[2 * i], lo, d1); d1 = fmaf(q1[2 * i + 1], hi, d1);
        }
#pragma unroll
        for (int o = 4; o > 0; o >>= 1) { d0 += __shfl_xor_sync(0xffffffffu, d0, o); d1 += __shfl_xor_sync(0xffffffffu, d1, o); }
        if (part == 0 && base + sub < nkeys) { scores[key] = d0; scores[stride + key] = d1; }
    }
}
__device__ void split_softmax(float* scores, int stride, int nkeys, float* head_max, float* head_sum) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp >= 2) return;
    float mx = -INFINITY;
    for (int key = lane; key < nkeys; key += 32) mx = fmaxf(mx, scores[warp * stride + key]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sm = 0;
    for (int key = lane; key < nkeys; key += 32) {
        const float e = expf(scores[warp * stride + key] - mx);
        scores[warp * stride + key] = e;
        sm += e;
    }
    sm = warp_sum(sm);
    if (lane == 0) { head_max[warp] = mx; head_sum[warp] = sm; }
}
template <typename KeyAt>
__device__ void split_values(const float* scores, int stride, int nkeys, KeyAt key_at, const float* head_max,
                             const float* head_sum, float* part0, float* part1) {
    const int tid = threadIdx.x, h = tid >> 8, dg = (tid >> 2) & 63, kq = tid & 3;
    float a0 = 0, a1 = 0;
    for (int key = kq; key < nkeys; key += 4) {
        const float pr = scores[h * stride + key];
        const unsigned v = *reinterpret_cast<const unsigned*>(key_at(key) + 128 + 2 * dg);
        a0 = fmaf(pr, __uint_as_float(v << 16), a0);
        a1 = fmaf(pr, __uint_as_float(v & 0xffff0000u), a1);
    }
    a0 += __shfl_xor_sync(0xffffffffu, a0, 1); a1 += __shfl_xor_sync(0xffffffffu, a1, 1);
    a0 += __shfl_xor_sync(0xffffffffu, a0, 2); a1 += __shfl_xor_sync(0xffffffffu, a1, 2);
    float* part = h ? part1 : part0;
    if (kq == 0) { part[2 * dg] = a0; part[2 * dg + 1] = a1; }
    if (tid == 0 || tid == 256) { part[HD] = head_max[h]; part[HD + 1] = head_sum[h]; }
}
// Value d of one q head merged from its `splits` partial rows at `base` (PSTRIDE apart, read from L2).
__device__ float merged_value(const float* base, int splits, int d) {
    float bm = -INFINITY;
    for (int s2 = 0; s2 < splits; ++s2) bm = fmaxf(bm, __ldcg(base + s2 * PSTRIDE + HD));
    float tot = 0, val = 0;
    for (int s2 = 0; s2 < splits; ++s2) {
        const float t = __ldcg(base + s2 * PSTRIDE + HD + 1);
        if (t > 0) {
            const float f = expf(__ldcg(base + s2 * PSTRIDE + HD) - bm);
            tot += t * f;
            val += __ldcg(base + s2 * PSTRIDE + d) * f;
        }
    }
    return val / tot;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) mk_layers(Params p) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16_t* bufs[2] = {reinterpret_cast<bf16_t*>(smem), reinterpret_cast<bf16_t*>(smem + BUF_BYTES)};
    bf16_t* x = reinterpret_cast<bf16_t*>(smem + 2 * BUF_BYTES);  // up to I bf16
    float* out = reinterpret_cast<float*>(smem + 2 * BUF_BYTES + I * 2);  // 128 floats
    float* seg = out + 128;  // 256 floats
    float* scratch = seg + 256;  // 32 floats
    __shared__ __align__(8) unsigned long long bars[2];
    __shared__ float att_max[2][WARPS], att_sum[2][WARPS];
    __shared__ float att_acc[2][WARPS][HD];
    __shared__ bool merges;
    const int b = blockIdx.x, nb = gridDim.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid == 0) { mbar_init(&bars[0]); mbar_init(&bars[1]); }
    __syncthreads();
    unsigned phase[2] = {0, 0};
    const int total = LAYERS * STAGES;
    if (p.preload) issue_load(p, 0, 0, bufs[0], &bars[0]);
    for (int g = 0; g < total; ++g) {
        const int layer = g / STAGES, stage = g % STAGES, slot = g & 1;
        const LayerW& w = p.layers[layer];
        unsigned* cnt = p.counters + layer * 8;
        unsigned long long* tr = p.trace ? p.trace + ((size_t)g * nb + b) * 8 : nullptr;
        if (tr && tid == 0) tr[0] = gtime();
        if (p.preload && g + 1 < total) issue_load(p, (g + 1) / STAGES, (g + 1) % STAGES, bufs[slot ^ 1], &bars[slot ^ 1]);
        // wait for the previous stage's outputs
        if (g > 0) {
            const int pl = (g - 1) / STAGES, ps = (g - 1) % STAGES;
            wait_count(p.counters + pl * 8 + ps, ps == S_ATTN ? (p.variant >= 1 ? KVH * p.splits : KVH) : nb);
        }
        if (tr && tid == 0) tr[1] = gtime();
        if (!p.preload) issue_load(p, layer, stage, bufs[slot], &bars[slot]);
        bf16_t* wb = bufs[slot];
        if (tr) { mbar_wait(&bars[slot], phase[slot]); if (tid == 0) tr[2] = gtime(); }
        if (stage == S_QKV) {
            norm_to_smem(p.hidden, w.norm1, x, scratch);
            if (tr && tid == 0) tr[4] = gtime();
            const long long c_start = clock64();
            mbar_wait(&bars[slot], phase[slot]);
            Share s = share_of(QKV, b, nb);
            if (p.variant >= 1) gemv_xreg<H, 1>(wb, x, s.rows, out, seg); else
            smem_gemv(wb, x, s.rows, H, out, seg);
            if (tr && tid == 0) { tr[5] = gtime(); tr[7] = clock64() - c_start; }
            for (int r = tid; r < s.rows; r += THREADS) p.qkv_out[s.r0 + r] = out[r];
            __syncthreads();
            if (tr && tid == 0) tr[6] = gtime();
            arrive(cnt + S_QKV);
        } else if (stage == S_ATTN) {
            mbar_wait(&bars[slot], phase[slot]);
            if (p.variant == 2 && b < KVH * p.splits) {
                const int SPL = p.splits;
                const int kvh = b / SPL, split = b % SPL;
                const int per = (p.ctx + SPL - 1) / SPL, k0 = min(p.ctx, split * per), k1 = min(p.ctx, k0 + per);
                const int nkeys = k1 - k0;
                float* scores = reinterpret_cast<float*>(x);  // [2][MAXK] floats, x is 6 KB: MAXK <= 768
                constexpr int MAXK = 768;
                const int part = lane & 7;
                float q0[16], q1[16];
#pragma unroll
                for (int i = 0; i < 16; i += 4) {
                    const float4 a = __ldcg(reinterpret_cast<const float4*>(p.qkv_out + (2 * kvh) * HD + part * 16 + i));
                    const float4 c = __ldcg(reinterpret_cast<const float4*>(p.qkv_out + (2 * kvh + 1) * HD + part * 16 + i));
                    q0[i] = a.x * 0.0883883f; q0[i + 1] = a.y * 0.0883883f; q0[i + 2] = a.z * 0.0883883f; q0[i + 3] = a.w * 0.0883883f;
                    q1[i] = c.x * 0.0883883f; q1[i + 1] = c.y * 0.0883883f; q1[i + 2] = c.z * 0.0883883f; q1[i + 3] = c.w * 0.0883883f;
                }
                auto key_at = [&](int key) { return wb + (size_t)key * 256; };
                split_scores(q0, q1, nkeys, key_at, scores, MAXK);
                __syncthreads();
                __shared__ float head_max[2], head_sum[2];
                split_softmax(scores, MAXK, nkeys, head_max, head_sum);
                __syncthreads();
                float* part0 = p.partials + ((size_t)(2 * kvh) * SPL + split) * PSTRIDE;
                split_values(scores, MAXK, nkeys, key_at, head_max, head_sum, part0, part0 + SPL * PSTRIDE);
                arrive(cnt + S_ATTN);
            } else
            if (b < KVH * p.splits) {
                const int SPL = p.splits;
                const int kvh = b / SPL, split = b % SPL;
                const int per = (p.ctx + SPL - 1) / SPL, k0 = min(p.ctx, split * per), k1 = min(p.ctx, k0 + per);
                const int nkeys = k1 - k0;
                // q heads 2kvh, 2kvh+1; warp w: keys w, w + WARPS, ...; lane holds dims 4 lane..4 lane+3
                float q[2][4];
                for (int h = 0; h < 2; ++h)
                    for (int i = 0; i < 4; ++i) q[h][i] = __ldcg(p.qkv_out + (2 * kvh + h) * HD + 4 * lane + i) * 0.0883883f;
                float m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0}, acc[2][4] = {};
                for (int key = warp; key < nkeys; key += WARPS) {
                    const bf16_t* kr = wb + (size_t)key * 256;
                    const uint2 kw = *reinterpret_cast<const uint2*>(kr + 4 * lane);
                    const uint2 vw = *reinterpret_cast<const uint2*>(kr + 128 + 4 * lane);
                    const float kf[4] = {__uint_as_float(kw.x << 16), __uint_as_float(kw.x & 0xffff0000u), __uint_as_float(kw.y << 16), __uint_as_float(kw.y & 0xffff0000u)};
                    const float vf[4] = {__uint_as_float(vw.x << 16), __uint_as_float(vw.x & 0xffff0000u), __uint_as_float(vw.y << 16), __uint_as_float(vw.y & 0xffff0000u)};
                    for (int h = 0; h < 2; ++h) {
                        float d = 0;
                        for (int i = 0; i < 4; ++i) d += q[h][i] * kf[i];
                        d = warp_sum(d);
                        const float nm = fmaxf(m[h], d), c = expf(m[h] - nm), e = expf(d - nm);
                        l[h] = l[h] * c + e;
                        for (int i = 0; i < 4; ++i) acc[h][i] = acc[h][i] * c + e * vf[i];
                        m[h] = nm;
                    }
                }
                for (int h = 0; h < 2; ++h) {
                    if (lane == 0) { att_max[h][warp] = m[h]; att_sum[h][warp] = l[h]; }
                    for (int i = 0; i < 4; ++i) att_acc[h][warp][4 * lane + i] = acc[h][i];
                }
                __syncthreads();
                if (tid < 2 * HD) {
                    const int h = tid / HD, d = tid % HD;
                    float bm = -INFINITY;
                    for (int ww = 0; ww < WARPS; ++ww) bm = fmaxf(bm, att_max[h][ww]);
                    float tot = 0, val = 0;
                    for (int ww = 0; ww < WARPS; ++ww)
                        if (att_sum[h][ww] > 0) {
                            const float f = expf(att_max[h][ww] - bm);
                            tot += att_sum[h][ww] * f;
                            val += att_acc[h][ww][d] * f;
                        }
                    float* part = p.partials + ((size_t)(2 * kvh + h) * SPL + split) * PSTRIDE;
                    part[d] = val;
                    if (d == 0) { part[HD] = bm; part[HD + 1] = tot; }
                }
                if (p.variant == 1) {
                    arrive(cnt + S_ATTN);
                } else {
                __threadfence();
                __syncthreads();
                if (tid == 0) {
                    const unsigned a = atomicAdd(p.counters + LAYERS * 8 + layer * KVH + kvh, 1u);
                    merges = a == SPL - 1;
                }
                __syncthreads();
                if (merges) {
                    __threadfence();
                    if (tid < 2 * HD) {
                        const int h = tid / HD, d = tid % HD;
                        const float* base = p.partials + (size_t)(2 * kvh + h) * SPL * PSTRIDE;
                        p.attn_out[(2 * kvh + h) * HD + d] = f2bf(merged_value(base, SPL, d));
                    }
                    arrive(cnt + S_ATTN);
                }
                }
            }
        } else if (stage == S_O || stage == S_DOWN) {
            const int k = stage == S_O ? QD : I;
            const bf16_t* src = stage == S_O ? p.attn_out : p.act;
            if (p.variant >= 1 && stage == S_O) {
                const int head = tid >> 5, d0 = 4 * (tid & 31), SPL = p.splits;
                const float* base = p.partials + (size_t)head * SPL * PSTRIDE;
                float bm = -INFINITY, tot = 0, v0 = 0, v1 = 0, v2 = 0, v3 = 0;
#pragma unroll 4
                for (int s2 = 0; s2 < SPL; ++s2) {
                    const float4 tail = __ldcg(reinterpret_cast<const float4*>(base + s2 * PSTRIDE + HD));
                    const float4 a = __ldcg(reinterpret_cast<const float4*>(base + s2 * PSTRIDE + d0));
                    if (tail.y > 0) {
                        const float nm = fmaxf(bm, tail.x), c = expf(bm - nm), f = expf(tail.x - nm);
                        tot = tot * c + tail.y * f;
                        v0 = v0 * c + a.x * f; v1 = v1 * c + a.y * f; v2 = v2 * c + a.z * f; v3 = v3 * c + a.w * f;
                        bm = nm;
                    }
                }
                bf16_t* xo = x + head * HD + d0;
                xo[0] = f2bf(v0 / tot); xo[1] = f2bf(v1 / tot); xo[2] = f2bf(v2 / tot); xo[3] = f2bf(v3 / tot);
            } else
            for (int i = tid; i < k / 8; i += THREADS) reinterpret_cast<uint4*>(x)[i] = __ldcg(reinterpret_cast<const uint4*>(src) + i);
            Share s = share_of(H, b, nb);
            float old = 0;
            if (tid < s.rows) old = __ldcg(p.hidden + s.r0 + tid);
            __syncthreads();
            mbar_wait(&bars[slot], phase[slot]);
            if (p.variant >= 1) {
                if (stage == S_O) gemv_xreg<QD, 2>(wb, x, s.rows, out, seg); else gemv_xreg<I, 2>(wb, x, s.rows, out, seg);
            } else
            smem_gemv(wb, x, s.rows, k, out, seg);
            if (tid < s.rows) p.hidden[s.r0 + tid] = old + out[tid];
            arrive(cnt + stage);
        } else {
            norm_to_smem(p.hidden, w.norm2, x, scratch);
            if (tr && tid == 0) tr[4] = gtime();
            mbar_wait(&bars[slot], phase[slot]);
            Share s = share_of(I, b, nb);
            if (p.variant >= 1) gemv_xreg<H, 1>(wb, x, 2 * s.rows, out, seg); else
            smem_gemv(wb, x, 2 * s.rows, H, out, seg);
            if (tr && tid == 0) tr[5] = gtime();
            for (int r = tid; r < s.rows; r += THREADS) {
                const float gv = out[r], uv = out[s.rows + r];
                p.act[s.r0 + r] = f2bf(gv / (1.f + expf(-gv)) * uv);
            }
            __syncthreads();
            if (tr && tid == 0) tr[6] = gtime();
            arrive(cnt + S_GU);
        }
        if (tr && tid == 0) tr[3] = gtime();
        phase[slot] ^= 1;
        __syncthreads();  // every thread is done with the buffer before it is refilled
    }
}

// Barrier-only rounds.
extern "C" __global__ void __launch_bounds__(THREADS, 1) barrier_rounds(unsigned* counters, int rounds) {
    for (int r = 0; r < rounds; ++r) {
        arrive(counters + r);
        wait_count(counters + r, gridDim.x);
    }
}

// Flag barrier: each block writes its round number into its own slot; the consumer's warp 0 polls all slots.
extern "C" __global__ void __launch_bounds__(THREADS, 1) flag_rounds(unsigned* flags, int rounds) {
    for (int r = 1; r <= rounds; ++r) {
        __syncthreads();
        if (threadIdx.x == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flags + blockIdx.x * 32), "r"(r) : "memory");
        if (threadIdx.x < 32) {
            bool all;
            do {
                bool mine = true;
                for (int i = threadIdx.x; i < gridDim.x; i += 32) {
                    unsigned v;
                    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flags + i * 32) : "memory");
                    mine &= v >= (unsigned)r;
                }
                all = __all_sync(0xffffffffu, mine);
            } while (!all);
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
        }
        __syncthreads();
    }
}
// Counter barrier with relaxed atomics and a fence on each side.
extern "C" __global__ void __launch_bounds__(THREADS, 1) relaxed_rounds(unsigned* counters, int rounds) {
    for (int r = 0; r < rounds; ++r) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(counters + r, 1u);
            unsigned v;
            do { asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counters + r) : "memory"); } while (v < gridDim.x);
            __threadfence();
        }
        __syncthreads();
    }
}

// gemv_xreg alone, on smem data: cycles per call
extern "C" __global__ void __launch_bounds__(THREADS, 1) gemv_alone(long long* cycles, float* sink, int calls) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16_t* wb = reinterpret_cast<bf16_t*>(smem);
    bf16_t* x = reinterpret_cast<bf16_t*>(smem + 2 * BUF_BYTES);
    float* out = reinterpret_cast<float*>(smem + 2 * BUF_BYTES + I * 2);
    float* seg = out + 128;
    for (int i = threadIdx.x; i < BUF_BYTES / 2; i += THREADS) wb[i] = (bf16_t)(0x3c00 + (i & 255));
    for (int i = threadIdx.x; i < I; i += THREADS) x[i] = (bf16_t)(0x3c00 + (i & 127));
    __syncthreads();
    float total = 0;
    long long t0 = clock64();
    for (int c = 0; c < calls; ++c) {
        gemv_xreg<H, 1>(wb, x, 32, out, seg);
        total += out[c & 31];
    }
    long long t1 = clock64();
    for (int c = 0; c < calls; ++c) {
        gemv_xreg<H, 1>(wb, x, 48, out, seg);
        total += out[c & 31];
    }
    long long t2 = clock64();
    for (int c = 0; c < calls; ++c) {
        smem_gemv(wb, x, 32, H, out, seg);
        total += out[c & 31];
    }
    long long t3 = clock64();
    if (threadIdx.x == 0) { cycles[blockIdx.x * 3] = (t1 - t0) / calls; cycles[blockIdx.x * 3 + 1] = (t2 - t1) / calls; cycles[blockIdx.x * 3 + 2] = (t3 - t2) / calls; }
    if (total == 12345.f) sink[0] = total;
}

// ---- v3: hand-offs through tagged values, weights streamed through a ring of 16 KB pieces ----
// Every value a stage hands on is stored as one 64-bit word, its f32 bits above a tag (epoch·256 + the stage
// that wrote it), as NCCL's LL protocol does: the consumer polls the values themselves, so a hand-off is the
// producer's store and the consumer's read (no fence, counter or second round trip). Each block owns the same
// rows of the hidden state in o_proj and down_proj, so it keeps them in shared memory and writes only tagged
// copies (two buffers, by stage parity, so no block overwrites values another may still read). Weights (and the
// attention's keys) stream into a ring of 16 KB pieces, each with its own mbarrier: thread 0 keeps every free
// piece loading (up to `max_ahead` stages ahead), a stage's pieces free at its end, and a warp waits only for
// the pieces holding its rows.
constexpr int SLOT_BYTES = 16384, NSLOTS = 12;
constexpr int V3_MAX_KEYS = 128;  // keys a split
// qkv rows, keys, o rows, gate_up units, down rows a piece
__device__ __forceinline__ int rows_per_piece(int stage) { return stage == S_QKV ? 8 : stage == S_ATTN ? 32 : stage == S_DOWN ? 2 : 4; }

__device__ __forceinline__ void ll_store(unsigned long long* at, float value, unsigned tag) {
    const unsigned long long word = ((unsigned long long)__float_as_uint(value) << 32) | tag;
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(at), "l"(word) : "memory");
}
// The two tagged values at `at` (16-byte aligned), once both carry `tag`.
__device__ __forceinline__ float2 ll_load2(const unsigned long long* at, unsigned tag) {
    unsigned long long a, b;
    do {
        asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(at) : "memory");
    } while ((unsigned)a != tag || (unsigned)b != tag);
    return make_float2(__uint_as_float((unsigned)(a >> 32)), __uint_as_float((unsigned)(b >> 32)));
}
__device__ __forceinline__ int v3_split_keys(const Params& p, int b, int* k0) {
    if (b >= KVH * p.splits) { *k0 = 0; return 0; }
    const int split = b % p.splits, per = (p.ctx + p.splits - 1) / p.splits;
    *k0 = min(p.ctx, split * per);
    return min(p.ctx, *k0 + per) - *k0;
}
// This block's rows (keys, units) of a stage.
__device__ __forceinline__ int v3_rows(const Params& p, int stage) {
    const int b = blockIdx.x, nb = gridDim.x;
    int k0;
    switch (stage) {
        case S_QKV: return share_of(QKV, b, nb).rows;
        case S_ATTN: return v3_split_keys(p, b, &k0);
        case S_GU: return share_of(I, b, nb).rows;
        default: return share_of(H, b, nb).rows;
    }
}
__device__ __forceinline__ int v3_pieces(const Params& p, int stage) {
    return (v3_rows(p, stage) + rows_per_piece(stage) - 1) / rows_per_piece(stage);
}
// thread 0: piece `i` of stage g into `dst`
__device__ void v3_issue_piece(const Params& p, int g, int i, unsigned char* dst, unsigned long long* bar) {
    const int layer = g / STAGES, stage = g % STAGES, b = blockIdx.x, nb = gridDim.x;
    const LayerW& w = p.layers[layer];
    const int per = rows_per_piece(stage), first = i * per, n = min(per, v3_rows(p, stage) - first);
    if (stage == S_QKV) {
        tma_expect(bar, n * H * 2);
        tma_copy(dst, w.qkv + (size_t)(share_of(QKV, b, nb).r0 + first) * H, n * H * 2, bar);
    } else if (stage == S_ATTN) {
        int k0;
        v3_split_keys(p, b, &k0);
        tma_expect(bar, n * 512);
        tma_copy(dst, w.kv + ((size_t)(b / p.splits) * p.ctx + k0 + first) * 256, n * 512, bar);
    } else if (stage == S_O) {
        tma_expect(bar, n * QD * 2);
        tma_copy(dst, w.o + (size_t)(share_of(H, b, nb).r0 + first) * QD, n * QD * 2, bar);
    } else if (stage == S_GU) {
        const int r0 = share_of(I, b, nb).r0 + first;
        tma_expect(bar, 2 * n * H * 2);
        tma_copy(dst, w.gate_up + (size_t)r0 * H, n * H * 2, bar);
        tma_copy(dst + n * H * 2, w.gate_up + (size_t)(I + r0) * H, n * H * 2, bar);
    } else {
        tma_expect(bar, n * I * 2);
        tma_copy(dst, w.down + (size_t)(share_of(H, b, nb).r0 + first) * I, n * I * 2, bar);
    }
}
// The same with x in shared memory as bf16 chunks.
template <int CH>
__device__ __forceinline__ float v3_dot_xsmem(const unsigned char* row, const uint4* x) {
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(row);
    uint4 wv[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) wv[j] = wr[lane + 32 * j];
    float acc[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < CH; ++j) acc[j & 1] += dot8_bf16(wv[j], x[lane + 32 * j]);
    return warp_sum(acc[0] + acc[1]);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) mk_v3(Params p) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    float* xf = reinterpret_cast<float*>(smem + NSLOTS * SLOT_BYTES);  // the stage's input, f32 (up to I)
    uint4* xb = reinterpret_cast<uint4*>(smem + NSLOTS * SLOT_BYTES);  // or bf16 chunks
    __shared__ __align__(8) unsigned long long bars[NSLOTS];
    __shared__ float warp_ss[WARPS];
    __shared__ float own_hidden[8];
    __shared__ float qs[2 * HD];
    __shared__ float scores[2][V3_MAX_KEYS];
    __shared__ float head_max[2], head_sum[2];
    __shared__ bool merges;
    const int b = blockIdx.x, nb = gridDim.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const V3& v = p.v3;
    const unsigned tag0 = v.epoch << 8;
    if (tid < NSLOTS) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_u32(&bars[tid])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    const Share own = share_of(H, b, nb);
    if (tid < own.rows) own_hidden[tid] = p.hidden[own.r0 + tid];
    __syncthreads();
    const int total = LAYERS * STAGES;
    // Pieces are numbered in load order; piece n sits in slot n % NSLOTS. `first` is the current stage's first
    // piece (every thread); thread 0's issue cursor: stage issue_g, its piece issue_i, `issued` pieces so far.
    int first = 0, issued = 0, issue_g = 0, issue_i = 0;
    auto piece = [&](int n) -> const unsigned char* {
        if (!(v.mode & 1)) mbar_wait(&bars[n % NSLOTS], (n / NSLOTS) & 1);
        return ring + (n % NSLOTS) * SLOT_BYTES;
    };
    for (int g = 0; g < total; ++g) {
        const int layer = g / STAGES, stage = g % STAGES;
        const LayerW& w = p.layers[layer];
        const unsigned in_tag = tag0 | (unsigned)(g - 1), out_tag = tag0 | (unsigned)g;
        unsigned long long* tr = p.trace ? p.trace + ((size_t)g * nb + b) * 8 : nullptr;
        if (tr && tid == 0) tr[0] = gtime();
        if (tid == 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            while (!(v.mode & 1) && issued < first + NSLOTS && issue_g < total && issue_g <= g + v.max_ahead) {
                if (issue_i >= v3_pieces(p, issue_g % STAGES)) { ++issue_g; issue_i = 0; continue; }
                v3_issue_piece(p, issue_g, issue_i, ring + (issued % NSLOTS) * SLOT_BYTES, &bars[issued % NSLOTS]);
                ++issued;
                ++issue_i;
            }
        }
        const int rows = v3_rows(p, stage), per = rows_per_piece(stage);
        if (!rows) {
            if (tr && tid == 0) tr[1] = tr[2] = gtime();
        } else if (stage == S_QKV || stage == S_GU) {
            const float* nw = stage == S_QKV ? w.norm1 : w.norm2;
            float nwr[4][8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 a = __ldg(reinterpret_cast<const float4*>(nw + 8 * (lane + 32 * j)));
                const float4 c = __ldg(reinterpret_cast<const float4*>(nw + 8 * (lane + 32 * j) + 4));
                nwr[j][0] = a.x; nwr[j][1] = a.y; nwr[j][2] = a.z; nwr[j][3] = a.w;
                nwr[j][4] = c.x; nwr[j][5] = c.y; nwr[j][6] = c.z; nwr[j][7] = c.w;
            }
            const int i0 = warp * 64 + 2 * lane;
            float2 hv;
            if (g == 0) hv = *reinterpret_cast<const float2*>(p.hidden + i0);
            else hv = ll_load2((stage == S_QKV ? v.hidden_down : v.hidden_o) + i0, in_tag);
            *reinterpret_cast<float2*>(xf + i0) = hv;
            const float ss = warp_sum(hv.x * hv.x + hv.y * hv.y);
            if (lane == 0) warp_ss[warp] = ss;
            __syncthreads();
            if (tr && tid == 0) tr[1] = gtime();
            const float scale = 1.f / sqrtf(warp_sum(lane < WARPS ? warp_ss[lane] : 0.f) / H + 1e-6f);
            float x[4][8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 a = *reinterpret_cast<const float4*>(xf + 8 * (lane + 32 * j));
                const float4 c = *reinterpret_cast<const float4*>(xf + 8 * (lane + 32 * j) + 4);
                const float hvals[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) x[j][e] = bf2f(f2bf(nwr[j][e] * (hvals[e] * scale)));
            }
            if (stage == S_QKV) {
                const int r0 = share_of(QKV, b, nb).r0;
                for (int row = warp; row < rows; row += WARPS) {
                    const unsigned char* at = piece(first + row / per) + (row % per) * H * 2;
                    if (tr && tid == 0) tr[2] = gtime();
                    const float d = dot_row_xreg<4>(at, x);
                    if (lane == 0) ll_store(v.qkv + r0 + row, d, out_tag);
                }
            } else {
                const int r0 = share_of(I, b, nb).r0;
                for (int unit = warp; unit < rows; unit += WARPS) {
                    const int pi = unit / per, in_piece = min(per, rows - pi * per);
                    const unsigned char* at = piece(first + pi) + (unit % per) * H * 2;
                    if (tr && tid == 0) tr[2] = gtime();
                    const float gv = dot_row_xreg<4>(at, x);
                    const float uv = dot_row_xreg<4>(at + in_piece * H * 2, x);
                    if (lane == 0) ll_store(v.act + r0 + unit, bf2f(f2bf(gv / (1.f + expf(-gv)) * uv)), out_tag);
                }
            }
        } else if (stage == S_ATTN) {
            int k0;
            const int nkeys = v3_split_keys(p, b, &k0);
            const int kvh = b / p.splits, split = b % p.splits, SPL = p.splits;
            if (v.mode & 2) {
                if (split == 0 && tid < HD) {
                    const float2 qv = ll_load2(v.qkv + 2 * kvh * HD + 2 * tid, in_tag);
                    ll_store(v.attn + 2 * kvh * HD + 2 * tid, qv.x, out_tag);
                    ll_store(v.attn + 2 * kvh * HD + 2 * tid + 1, qv.y, out_tag);
                }
                first += v3_pieces(p, stage);
                __syncthreads();
                if (tr && tid == 0) tr[1] = tr[2] = tr[3] = gtime();
                continue;
            }
            if (tid < HD) {
                const float2 qv = ll_load2(v.qkv + 2 * kvh * HD + 2 * tid, in_tag);
                qs[2 * tid] = qv.x * 0.0883883f;
                qs[2 * tid + 1] = qv.y * 0.0883883f;
            }
            __syncthreads();
            if (tr && tid == 0) tr[1] = gtime();
            for (int pi = 0; pi * per < nkeys; ++pi) piece(first + pi);
            if (tr && tid == 0) tr[2] = gtime();
            auto key_at = [&](int key) {
                return reinterpret_cast<const bf16_t*>(ring + ((first + key / per) % NSLOTS) * SLOT_BYTES) + (size_t)(key % per) * 256;
            };
            {
                const int part = lane & 7;
                float q0[16], q1[16];
#pragma unroll
                for (int i = 0; i < 16; ++i) { q0[i] = qs[part * 16 + i]; q1[i] = qs[HD + part * 16 + i]; }
                split_scores(q0, q1, nkeys, key_at, &scores[0][0], V3_MAX_KEYS);
            }
            __syncthreads();
            split_softmax(&scores[0][0], V3_MAX_KEYS, nkeys, head_max, head_sum);
            __syncthreads();
            float* part0 = p.partials + ((size_t)(2 * kvh) * SPL + split) * PSTRIDE;
            split_values(&scores[0][0], V3_MAX_KEYS, nkeys, key_at, head_max, head_sum, part0, part0 + SPL * PSTRIDE);
            __threadfence();
            __syncthreads();
            if (tid == 0) merges = (atomicAdd(v.merge_counters + layer * KVH + kvh, 1u) + 1) % SPL == 0;
            __syncthreads();
            if (merges && tid < 2 * HD) {
                __threadfence();
                const int h = tid / HD, d = tid % HD;
                const float* base = p.partials + (size_t)(2 * kvh + h) * SPL * PSTRIDE;
                ll_store(v.attn + (2 * kvh + h) * HD + d, bf2f(f2bf(merged_value(base, SPL, d))), out_tag);
            }
        } else {
            // o_proj or down_proj: the input's bf16 chunks into shared memory, a warp a row, the residual added
            const int k = stage == S_O ? QD : I;
            const unsigned long long* src = stage == S_O ? v.attn : v.act;
            const int per_warp = k / WARPS;  // 128 or 192 values
            bf16_t* xh = reinterpret_cast<bf16_t*>(xb);
            for (int i = 2 * lane; i < per_warp; i += 64) {
                const float2 a = ll_load2(src + warp * per_warp + i, in_tag);
                const unsigned packed = (unsigned)f2bf(a.x) | ((unsigned)f2bf(a.y) << 16);
                *reinterpret_cast<unsigned*>(xh + warp * per_warp + i) = packed;
            }
            __syncthreads();
            if (tr && tid == 0) tr[1] = gtime();
            if (warp < rows) {
                const unsigned char* at = piece(first + warp / per) + (warp % per) * k * 2;
                if (tr && tid == 0) tr[2] = gtime();
                const float d = stage == S_O ? v3_dot_xsmem<QD / 256>(at, xb) : v3_dot_xsmem<I / 256>(at, xb);
                if (lane == 0) {
                    const float nh = own_hidden[warp] + d;
                    own_hidden[warp] = nh;
                    ll_store((stage == S_O ? v.hidden_o : v.hidden_down) + own.r0 + warp, nh, out_tag);
                    if (g == total - 1) p.hidden[own.r0 + warp] = nh;
                }
            }
        }
        first += v3_pieces(p, stage);
        __syncthreads();  // every thread is done with the stage's pieces and inputs
        if (tr && tid == 0) tr[3] = gtime();
    }
}

// ---- reference: one simple kernel per stage, no PDL ----
__global__ void ref_norm_gemv(const float* hidden, const float* nw, const bf16_t* w, int k, int n, float* out) {
    __shared__ float scratch[32];
    __shared__ float xs[H];
    float ss = 0;
    for (int i = threadIdx.x; i < H; i += blockDim.x) ss += hidden[i] * hidden[i];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    ss = warp_sum(ss);
    if (lane == 0) scratch[warp] = ss;
    __syncthreads();
    float t = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0;
    t = warp_sum(t);
    const float scale = 1.f / sqrtf(t / H + 1e-6f);
    for (int i = threadIdx.x; i < H; i += blockDim.x) xs[i] = bf2f(f2bf(nw[i] * (hidden[i] * scale)));
    __syncthreads();
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= n) return;
    float s = 0;
    for (int c = lane; c < k; c += 32) s += bf2f(w[(size_t)row * k + c]) * xs[c];
    s = warp_sum(s);
    if (lane == 0) out[row] = s;
}
__global__ void ref_add_gemv(const bf16_t* x, const bf16_t* w, int k, int n, float* hidden) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= n) return;
    float s = 0;
    for (int c = lane; c < k; c += 32) s += bf2f(w[(size_t)row * k + c]) * bf2f(x[c]);
    s = warp_sum(s);
    if (lane == 0) hidden[row] += s;
}
__global__ void ref_swiglu(const float* gu, bf16_t* act) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < I) { const float g = gu[i], u = gu[I + i]; act[i] = f2bf(g / (1.f + expf(-g)) * u); }
}
__global__ void ref_attn(const float* qkv, const bf16_t* kv, int ctx, bf16_t* out) {
    // block: q head; one thread per dim, serial over keys (slow, correct)
    const int h = blockIdx.x, kvh = h / 2, d = threadIdx.x;
    __shared__ float q[HD];
    __shared__ float red[HD];
    q[d] = qkv[h * HD + d] * 0.0883883f;
    __syncthreads();
    float m = -INFINITY, l = 0, acc = 0;
    for (int key = 0; key < ctx; ++key) {
        const bf16_t* kr = kv + ((size_t)kvh * ctx + key) * 256;
        red[d] = q[d] * bf2f(kr[d]);
        __syncthreads();
        float s = 0;
        for (int i = 0; i < HD; ++i) s += red[i];
        __syncthreads();
        const float nm = fmaxf(m, s), c = expf(m - nm), e = expf(s - nm);
        l = l * c + e;
        acc = acc * c + e * bf2f(kr[128 + d]);
        m = nm;
    }
    out[h * HD + d] = f2bf(acc / l);
}

static unsigned long long rng = 88172645463325252ull;
static float frand() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f; }
static bf16_t h2bf(float f) { unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (bf16_t)(u >> 16); }

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const int ctx = argc > 1 ? atoi(argv[1]) : 550;
    int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s, %d SMs, ctx %d\n", prop.name, sms, ctx);
    const size_t per_layer = (size_t)QKV * H + (size_t)H * QD + (size_t)2 * I * H + (size_t)H * I;
    const size_t kv_per_layer = (size_t)KVH * ctx * 256;
    std::vector<bf16_t> hw(per_layer + kv_per_layer);
    for (auto& v : hw) v = h2bf(frand() * 0.05f);
    std::vector<float> hn(2 * H);
    for (auto& v : hn) v = 1.f + 0.1f * frand();
    Params p{};
    for (int l = 0; l < LAYERS; ++l) {
        bf16_t* d; CK(cudaMalloc(&d, hw.size() * 2)); CK(cudaMemcpy(d, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice));
        for (size_t i = 0; i < 64; ++i) hw[(i * 7919 + l) % hw.size()] ^= 0x40;  // layers differ a little
        float* n; CK(cudaMalloc(&n, 2 * H * 4)); CK(cudaMemcpy(n, hn.data(), 2 * H * 4, cudaMemcpyHostToDevice));
        p.layers[l] = {d, d + (size_t)QKV * H, d + (size_t)QKV * H + (size_t)H * QD, d + (size_t)QKV * H + (size_t)H * QD + (size_t)2 * I * H,
                       d + per_layer, n, n + H};
    }
    std::vector<float> h0(H);
    for (auto& v : h0) v = frand();
    CK(cudaMalloc(&p.hidden, H * 4)); CK(cudaMalloc(&p.qkv_out, QKV * 4)); CK(cudaMalloc(&p.attn_out, QD * 2));
    CK(cudaMalloc(&p.act, I * 2)); CK(cudaMalloc(&p.partials, QH * SPLITS * PSTRIDE * 4));
    const size_t counter_bytes = (LAYERS * 8 + LAYERS * KVH + 8) * 4;
    CK(cudaMalloc(&p.counters, 8192 * 4));  // flag_rounds: one slot in 32 per block
    p.ctx = ctx;
    float* gu; CK(cudaMalloc(&gu, 2 * I * 4));
    const size_t smem = 2 * BUF_BYTES + I * 2 + (128 + 256 + 32) * 4;
    CK(cudaFuncSetAttribute(mk_layers, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    cudaFuncAttributes fa; CK(cudaFuncGetAttributes(&fa, mk_layers));
    printf("mk_layers: %d registers, %zu static smem, dynamic %zu\n", fa.numRegs, fa.sharedSizeBytes, smem);
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));

    // reference
    CK(cudaMemcpy(p.hidden, h0.data(), H * 4, cudaMemcpyHostToDevice));
    for (int l = 0; l < LAYERS; ++l) {
        const LayerW& w = p.layers[l];
        ref_norm_gemv<<<QKV / 8, 256>>>(p.hidden, w.norm1, w.qkv, H, QKV, p.qkv_out);
        ref_attn<<<QH, HD>>>(p.qkv_out, w.kv, ctx, p.attn_out);
        ref_add_gemv<<<H / 8, 256>>>(p.attn_out, w.o, QD, H, p.hidden);
        ref_norm_gemv<<<2 * I / 8, 256>>>(p.hidden, w.norm2, w.gate_up, H, 2 * I, gu);
        ref_swiglu<<<I / 256, 256>>>(gu, p.act);
        ref_add_gemv<<<H / 8, 256>>>(p.act, w.down, I, H, p.hidden);
    }
    CK(cudaDeviceSynchronize());
    std::vector<float> ref(H), got(H);
    CK(cudaMemcpy(ref.data(), p.hidden, H * 4, cudaMemcpyDeviceToHost));

    float* h0d; CK(cudaMalloc(&h0d, H * 4)); CK(cudaMemcpy(h0d, h0.data(), H * 4, cudaMemcpyHostToDevice));
    const int reps = 200;
    std::vector<cudaEvent_t> ev(2 * reps);
    for (auto& event : ev) CK(cudaEventCreate(&event));
    // Times `reps` launches (`launch` each, the hidden state reset before it), checks the result against the
    // reference, and prints the median of the second half under `label`.
    auto time_launches = [&](const char* label, auto launch) {
        for (int r = 0; r < reps; ++r) {
            CK(cudaMemcpyAsync(p.hidden, h0d, H * 4, cudaMemcpyDeviceToDevice));
            CK(cudaEventRecord(ev[2 * r]));
            launch();
            CK(cudaEventRecord(ev[2 * r + 1]));
        }
        CK(cudaDeviceSynchronize());
        std::vector<float> t;
        for (int r = reps / 2; r < reps; ++r) { float ms; CK(cudaEventElapsedTime(&ms, ev[2 * r], ev[2 * r + 1])); t.push_back(ms * 1000); }
        std::sort(t.begin(), t.end());
        CK(cudaMemcpy(got.data(), p.hidden, H * 4, cudaMemcpyDeviceToHost));
        double maxd = 0, maxr = 0;
        for (int i = 0; i < H; ++i) { maxd = std::max(maxd, (double)fabsf(got[i] - ref[i])); maxr = std::max(maxr, (double)fabsf(ref[i])); }
        printf("%s: 28 layers median %.1f us min %.1f (%.2f us/layer), max |diff| %.3g of max |ref| %.3g\n", label, t[t.size() / 2], t[0],
               t[t.size() / 2] / LAYERS, maxd, maxr);
    };
    auto timed = [&](const char* label) {
        // A split's keys must fit one shared-memory buffer (and v2's score rows).
        const int split_keys = (ctx + p.splits - 1) / p.splits;
        if (split_keys * 512 > BUF_BYTES || split_keys > 768) {
            printf("%s: skipped, %d keys a split do not fit a %d-byte buffer\n", label, split_keys, BUF_BYTES);
            return;
        }
        time_launches(label, [&]() {
            CK(cudaMemsetAsync(p.counters, 0, counter_bytes));
            void* args[] = {&p};
            CK(cudaLaunchCooperativeKernel((void*)mk_layers, sms, THREADS, args, smem, 0));
        });
    };
    // warm the clocks
    p.preload = 1; p.splits = 16; p.variant = 0;
    for (int r = 0; r < 3; ++r) timed("warm-up");
    p.splits = 16; p.variant = 0;
    p.preload = 1; timed("v0 splits 16");
    p.variant = 1; p.splits = 4; timed("v1 splits 4");
    p.variant = 2;
    for (int sp : {4, 8, 16}) { p.splits = sp; char label[64]; snprintf(label, 64, "v2 splits %d", sp); timed(label); }
    p.preload = 0; timed("v2 splits 16, each stage loading its weights only after its wait");
    p.preload = 1; p.variant = 1; p.splits = 4; timed("v1 splits 4");
    p.variant = 2; p.splits = 8;
    if ((ctx + p.splits - 1) / p.splits * 512 <= BUF_BYTES) {
        p.preload = 1;
        const int nb = sms;
        std::vector<unsigned long long> tr((size_t)LAYERS * STAGES * nb * 8);
        CK(cudaMalloc(&p.trace, tr.size() * 8));
        for (int r = 0; r < 3; ++r) {
            CK(cudaMemset(p.counters, 0, counter_bytes));
            void* args[] = {&p};
            CK(cudaLaunchCooperativeKernel((void*)mk_layers, sms, THREADS, args, smem, 0));
            CK(cudaDeviceSynchronize());
        }
        CK(cudaMemcpy(tr.data(), p.trace, tr.size() * 8, cudaMemcpyDeviceToHost));
        const char* names[STAGES] = {"qkv", "attn", "o", "gate_up", "down"};
        printf("trace (layers 1..27, mean over blocks; us): stage | start->barrier | barrier->weights | compute | stage span (first start..last end)\n");
        for (int st = 0; st < STAGES; ++st) {
            double a = 0, bw = 0, c = 0, span = 0; int n = 0;
            for (int l = 1; l < LAYERS; ++l) {
                const int g = l * STAGES + st;
                unsigned long long first = ~0ull, last = 0;
                for (int bb = 0; bb < nb; ++bb) {
                    const unsigned long long* t = &tr[((size_t)g * nb + bb) * 8];
                    a += (t[1] - t[0]) / 1e3; bw += (t[2] - t[1]) / 1e3; c += (t[3] - t[2]) / 1e3; ++n;
                    first = std::min(first, t[0]); last = std::max(last, t[3]);
                }
                span += (last - first) / 1e3;
            }
            printf("  %-8s %6.2f %6.2f %6.2f %6.2f\n", names[st], a / n, bw / n, c / n, span / (LAYERS - 1));
            if (st == S_QKV || st == S_GU) {
                double n1 = 0, g1 = 0, s1 = 0, a1 = 0;
                for (int l = 1; l < LAYERS; ++l)
                    for (int bb = 0; bb < nb; ++bb) {
                        const unsigned long long* t = &tr[((size_t)(l * STAGES + st) * nb + bb) * 8];
                        n1 += (t[4] - t[2]) / 1e3; g1 += (t[5] - t[4]) / 1e3; s1 += (t[6] - t[5]) / 1e3; a1 += (t[3] - t[6]) / 1e3;
                    }
                printf("      norm %.2f gemv %.2f store %.2f arrive %.2f\n", n1 / n, g1 / n, s1 / n, a1 / n);
                if (st == S_QKV) {
                    double cyc = 0, ns = 0;
                    for (int l = 1; l < LAYERS; ++l) for (int bb = 0; bb < nb; ++bb) { const unsigned long long* t = &tr[((size_t)(l * STAGES) * nb + bb) * 8]; cyc += (double)t[7]; ns += (double)(t[5] - t[4]); }
                    printf("      qkv gemv: %.0f cycles over %.0f ns: %.2f GHz\n", cyc / n, ns / n, cyc / ns);
                }
            }
        }
        const unsigned long long t_first = tr[((size_t)1 * STAGES * nb) * 8];
        const unsigned long long t_last = tr[((size_t)(LAYERS * STAGES - 1) * nb) * 8 + 3];
        printf("  layers 1..27: %.2f us per layer (block 0)\n", (t_last - t_first) / 1e3 / (LAYERS - 1));
        CK(cudaFree(p.trace));
        p.trace = nullptr;
    }

    // v3: tagged hand-offs, the ring streamed ahead
    {
        const size_t smem_v3 = NSLOTS * SLOT_BYTES + I * 4;
        CK(cudaFuncSetAttribute(mk_v3, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_v3));
        cudaFuncAttributes fa3; CK(cudaFuncGetAttributes(&fa3, mk_v3));
        printf("mk_v3: %d registers, %zu static smem, dynamic %zu, %d bytes local\n", fa3.numRegs, fa3.sharedSizeBytes, smem_v3, (int)fa3.localSizeBytes);
        const size_t ll_words = QKV + QD + H + H + I;
        unsigned long long* ll; CK(cudaMalloc(&ll, ll_words * 8)); CK(cudaMemset(ll, 0, ll_words * 8));
        p.v3.qkv = ll; p.v3.attn = ll + QKV; p.v3.hidden_o = ll + QKV + QD; p.v3.hidden_down = ll + QKV + QD + H; p.v3.act = ll + QKV + QD + 2 * H;
        CK(cudaMalloc(&p.v3.merge_counters, LAYERS * KVH * 4));
        unsigned epoch = 0;
        auto launch_v3 = [&]() {
            p.v3.epoch = ++epoch;
            void* args[] = {&p};
            CK(cudaLaunchCooperativeKernel((void*)mk_v3, sms, THREADS, args, smem_v3, 0));
        };
        auto timed_v3 = [&](int splits, int ahead) {
            const int split_keys = (ctx + splits - 1) / splits;
            if (split_keys > V3_MAX_KEYS || (split_keys + 31) / 32 > NSLOTS) { printf("v3 splits %d: skipped\n", splits); return; }
            p.splits = splits; p.v3.max_ahead = ahead; p.trace = nullptr;
            CK(cudaMemset(p.v3.merge_counters, 0, LAYERS * KVH * 4));
            char label[64];
            snprintf(label, sizeof label, "v3 splits %d, %d stages ahead", splits, ahead);
            time_launches(label, launch_v3);
        };
        p.v3.mode = 0;
        for (int r = 0; r < 2; ++r) timed_v3(16, 8);
        for (int splits : {8, 16}) for (int ahead : {1, 2, 8}) timed_v3(splits, ahead);
        for (int splits : {8, 16}) for (int ahead : {1, 2, 8}) timed_v3(splits, ahead);
        for (int mode : {1, 2, 3}) {
            p.v3.mode = mode;
            printf("mode %d (%s):\n", mode, mode == 1 ? "no weight loads" : mode == 2 ? "attention copies q" : "both");
            for (int splits : {8, 16}) timed_v3(splits, 8);
        }
        p.v3.mode = 0;
        // one traced launch in each mode
        p.splits = 16; p.v3.max_ahead = 8;
        for (int mode : {0, 1, 3}) {
        p.v3.mode = mode;
        const int nb = sms;
        std::vector<unsigned long long> tr((size_t)LAYERS * STAGES * nb * 8);
        if (!p.trace) CK(cudaMalloc(&p.trace, tr.size() * 8));
        CK(cudaMemset(p.v3.merge_counters, 0, LAYERS * KVH * 4));
        for (int r = 0; r < 3; ++r) { CK(cudaMemcpy(p.hidden, h0d, H * 4, cudaMemcpyDeviceToDevice)); launch_v3(); CK(cudaDeviceSynchronize()); }
        CK(cudaMemcpy(tr.data(), p.trace, tr.size() * 8, cudaMemcpyDeviceToHost));
        const char* names[STAGES] = {"qkv", "attn", "o", "gate_up", "down"};
        printf("v3 trace, mode %d (splits 16, 8 ahead; layers 1..27, mean over blocks with work; us): stage | start->inputs | inputs->weights | compute | span (first start..last end) | last end - previous stage's last end\n", mode);
        for (int st = 0; st < STAGES; ++st) {
            double a = 0, bw = 0, c = 0, span = 0, step = 0; int n = 0;
            for (int l = 1; l < LAYERS; ++l) {
                const int g = l * STAGES + st;
                unsigned long long first = ~0ull, last = 0, prev_last = 0;
                for (int bb = 0; bb < nb; ++bb) {
                    const unsigned long long* t = &tr[((size_t)g * nb + bb) * 8];
                    const unsigned long long* tp = &tr[((size_t)(g - 1) * nb + bb) * 8];
                    prev_last = std::max(prev_last, tp[3]);
                    if (bb >= 128) continue;
                    a += (t[1] - t[0]) / 1e3; bw += (t[2] - t[1]) / 1e3; c += (t[3] - t[2]) / 1e3; ++n;
                    first = std::min(first, t[0]); last = std::max(last, t[3]);
                }
                span += (last - first) / 1e3;
                step += ((double)last - (double)prev_last) / 1e3;
            }
            printf("  %-8s %6.2f %6.2f %6.2f %6.2f %6.2f\n", names[st], a / n, bw / n, c / n, span / (LAYERS - 1), step / (LAYERS - 1));
        }
        const unsigned long long t_first = tr[((size_t)1 * STAGES * nb) * 8];
        const unsigned long long t_last = tr[((size_t)(LAYERS * STAGES - 1) * nb) * 8 + 3];
        printf("  layers 1..27: %.2f us per layer (block 0)\n", (t_last - t_first) / 1e3 / (LAYERS - 1));
        }
        p.v3.mode = 0;
        CK(cudaFree(p.trace));
        p.trace = nullptr;
    }
    {
        long long* cyc; float* sink;
        CK(cudaMalloc(&cyc, sms * 3 * 8)); CK(cudaMalloc(&sink, 4));
        CK(cudaFuncSetAttribute(gemv_alone, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        gemv_alone<<<sms, THREADS, smem>>>(cyc, sink, 200);
        CK(cudaDeviceSynchronize());
        std::vector<long long> hc(sms * 3);
        CK(cudaMemcpy(hc.data(), cyc, sms * 3 * 8, cudaMemcpyDeviceToHost));
        printf("gemv alone (block 0): xreg 32 rows %lld cycles, xreg 48 rows %lld, smem 32 rows %lld\n", hc[0], hc[1], hc[2]);
    }
    // barrier rounds: the best of `tries` launches of `kernel` on `blocks` blocks, in us a round
    {
        int rounds = 140;
        unsigned* c = p.counters;
        auto best_round = [&](void* kernel, int blocks, int tries) {
            float best = 1e9;
            for (int r = 0; r < tries; ++r) {
                CK(cudaMemset(c, 0, 8192 * 4));
                CK(cudaEventRecord(e0));
                void* args[] = {&c, &rounds};
                CK(cudaLaunchCooperativeKernel(kernel, blocks, THREADS, args, 0, 0));
                CK(cudaEventRecord(e1));
                CK(cudaEventSynchronize(e1));
                float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
                if (r >= 3) best = std::min(best, ms);
            }
            return best * 1000 / rounds;
        };
        printf("barrier only: %.3f us/round\n", best_round((void*)barrier_rounds, sms, 20));
        for (int blocks : {8, 16, 33, 66})
            printf("barrier only, %d blocks: %.3f us/round\n", blocks, best_round((void*)barrier_rounds, blocks, 10));
        printf("flag barrier: %.3f us/round\n", best_round((void*)flag_rounds, sms, 20));
        printf("relaxed counter barrier: %.3f us/round\n", best_round((void*)relaxed_rounds, sms, 20));
    }
    return 0;
}
