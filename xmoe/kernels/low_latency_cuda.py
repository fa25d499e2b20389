"""The low-latency dispatch and combine kernels as generated CUDA C: the GPU's store path.

The same protocol as ``kernels/low_latency.py`` (its Numba twin, which the simulator and
the put path run), written for latency: a warp a (token, top-k slot), 16-byte vector
stores through peer pointers, the FP8 cast fused into the send, and a signal per
(expert, source) instead of one per rank after every token.

Dispatch, ``SEND``: block 0 writes this rank's call shape into every peer's meta row and
raises its per-rank signal (a receiver checks the shape before it reads anything). Each
block counts this rank's tokens per expert in shared memory; experts it sends nothing
get their count (0) at once. A warp takes a (token, k) entry, numbers its slot (the
entries before it naming the same expert: a ballot over ``topk_idx``), stores the row (cast
to FP8 on the way, 16 channels a lane, 8 lanes a 128-channel group), its scales and its
source token into the owner's slot ``(local expert, this rank, slot)``, and counts the
entry sent for its expert; the warp that sends an expert's last entry raises the
expert's count word in the owner: ``(call << 32) | count``. ``RECEIVE``: once every peer's
shape is in, a block per local expert waits for the count word of each source and packs
the rows, source after source, into ``recv_x`` (16-byte loads that bypass L1).

Combine, ``SEND``: a block per local expert stores each received row into slot
``(expert, source token)`` of its source, then raises that expert's flag (the call's
number) in every source. ``RECEIVE``: a warp a (token, 256 channels) waits for the flags of
the token's k experts and sums their rows in float32 (a product, then a sum, each rounded: the reference's
order), rounded once to bfloat16.

Every field is 8 bytes (:mod:`xmoe.kernels.raw_launch`); the constants come from the
modules that own them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from xmoe.comm.protocol import WORK_EXITED, WORK_NEXT, WORK_NEXT_SECOND, WORK_WORDS
from xmoe.comm.status import ERR_EXPERT_ID, ERR_MISMATCH, ERR_TIMEOUT, FIELD_SHIFT
from xmoe.kernels.cuda_c import PRELUDE
from xmoe.kernels.low_latency import RECEIVE, SEND
from xmoe.kernels.numerics import AMAX_FLOOR, E4M3_MAX
from xmoe.kernels.raw_launch import ParamStruct
from xmoe.layout.symmetric import FP8_GROUP, META_HEADER

#: Threads a block of either kernel: 8 warps. At 2 PEs, 128 tokens, top-8 and 256 experts
#: a dispatch has 1024 (token, k) entries and 128 local experts: 128 blocks give a warp an
#: entry and a block an expert.
THREADS = 256
#: Blocks an SM must hold (``__launch_bounds__``): 128 blocks on the 66 SMs of half an H200.
#: Without it NVRTC 13.5 capped the dispatch kernel at 64 registers and spilled 40 bytes
#: (13.0 did not); with it both give 80 registers and no spills.
MIN_BLOCKS_PER_SM = 3
#: Experts the dispatch counts in shared memory, and ranks the kernels keep counts of there.
MAX_EXPERTS = 1024
MAX_RANKS = 64

_CONTROL = (  # both kernels: the call's number, the protocol words, the peers
    ("long long", "phases"), ("long long", "pending_slot"), ("long long", "rank"), ("long long", "num_ranks"),
    ("long long", "num_experts"), ("long long", "hidden"), ("long long", "max_tokens"),
    ("const long long*", "peers"), ("long long*", "calls"), ("long long*", "pending"), ("const int*", "call_shape"),
    ("int*", "work"), ("long long", "timeout_ns"), ("int*", "errors"),
    ("long long*", "signals"), ("int*", "meta"), ("long long", "meta_length"), ("long long", "control_half_bytes"),
    ("long long", "data_half_bytes"), ("long long", "slot_bytes"),
)

DISPATCH = ParamStruct("DispatchParams", _CONTROL + (
    ("const bf16_t*", "x"), ("const long long*", "topk_idx"), ("long long", "num_tokens"), ("long long", "num_topk"),
    ("long long", "fp8"), ("long long", "round_scale"),
    ("unsigned char*", "slots"), ("float*", "slot_scales"), ("int*", "slot_src_idx"), ("long long*", "counts"),
    ("int*", "expert_sent"),
    ("unsigned char*", "recv_x"), ("float*", "recv_scales"), ("int*", "recv_packed_scales"), ("int*", "recv_count"),
    ("int*", "recv_src_info"), ("long long*", "recv_layout_range"), ("int*", "recv_stats"),
))

COMBINE = ParamStruct("CombineParams", _CONTROL + (
    ("const bf16_t*", "x"), ("const int*", "src_info"), ("const long long*", "layout_range"),
    ("const long long*", "topk_idx"), ("const float*", "topk_weights"), ("long long", "num_tokens"),
    ("long long", "num_topk"), ("bf16_t*", "out"), ("unsigned char*", "slots"), ("long long*", "flags"),
))

_COMMON = r"""
#define FULL 0xffffffffu
__device__ __forceinline__ long long now_ns() {
  long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
// A peer's address of a field of this rank's block.
template <class T> __device__ __forceinline__ T* at_peer(T* local, const long long* peers, long long dst) {
  return (T*)((char*)local + peers[dst]);
}
__device__ __forceinline__ long long load_acquire(const long long* p) {
  long long v; asm volatile("ld.acquire." SCOPE ".global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void store_release(long long* p, long long v) {
  asm volatile("st.release." SCOPE ".global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
// A word that orders nothing before it (a count of zero rows): no fence.
__device__ __forceinline__ void store_relaxed(long long* p, long long v) {
  asm volatile("st.relaxed." SCOPE ".global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int add_acq_rel(int* p, int v) {
  int old; asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ int4 load_l2(const void* p) { return __ldcg((const int4*)p); }
// The status words are mapped host memory: volatile, the first error stays.
__device__ __forceinline__ void report_error(int* errors, int code, int detail) {
  volatile int* e = errors;
  if (e[0] == 0) { e[1] = detail; e[0] = code; }
}
// Spin until (*p >> shift) == tag; false after timeout_ns.
__device__ __forceinline__ bool wait_tag(const long long* p, long long tag, int shift, long long timeout_ns,
                                         long long* value) {
  const long long start = now_ns();
  long long v = load_acquire(p);
  while ((v >> shift) != tag) {
    if (now_ns() - start > timeout_ns) return false;
    __nanosleep(32);
    v = load_acquire(p);
  }
  *value = v;
  return true;
}
// Block 0: this rank's call shape into every peer's meta row, then its per-rank signal there.
template <class P> __device__ void publish_shape(const P& p, int* meta, long long* signals, long long seq) {
  if (blockIdx.x == 0 && threadIdx.x < p.num_ranks) {
    const long long dst = threadIdx.x;
    volatile int* row = at_peer(meta, p.peers, dst) + p.rank * p.meta_length;
    for (int i = 0; i < META_HEADER; ++i) row[i] = p.call_shape[i];
    SCOPE_FENCE();
    store_release(at_peer(signals, p.peers, dst) + p.rank, seq);
  }
}
// Block-wide: true once every peer's signal of seq came with a call shape equal to this rank's.
// (It does not read the status words first: a read of mapped host memory by every block cost
// ~280 us a call, 1x H200, 128 blocks; waits are bounded anyway.)
template <class P> __device__ bool peers_agree(const P& p, const int* meta, const long long* signals, long long seq,
                                               int* flag) {
  if (threadIdx.x == 0) flag[0] = 0;
  __syncthreads();
  if (threadIdx.x < p.num_ranks) {
    const int src = threadIdx.x;
    long long value;
    if (!wait_tag(signals + src, seq, 0, p.timeout_ns, &value)) {
      flag[0] = 1; report_error(p.errors, ERR_TIMEOUT + src, 0);
    } else {
      for (int i = 0; i < META_HEADER; ++i) {
        const int theirs = ((volatile const int*)meta)[src * p.meta_length + i];
        if (theirs != p.call_shape[i]) {
          flag[0] = 1; report_error(p.errors, ERR_MISMATCH + (i << FIELD_SHIFT) + src, theirs); break;
        }
      }
    }
  }
  __syncthreads();
  const bool agree = !flag[0];
  __syncthreads();
  return agree;
}
// The call a launch belongs to: a send launch numbers it and leaves the number for its hook.
template <class P> __device__ long long launch_call(const P& p) {
  if (p.phases & SEND) {
    const long long seq = p.calls[0] + 1;
    if (blockIdx.x == 0 && threadIdx.x == 0) p.pending[p.pending_slot] = seq;
    return seq;
  }
  return p.pending[p.pending_slot];
}
// Block-wide: the next item of work counter `index`.
__device__ __forceinline__ int claim_block(int* work, int index, int* slot) {
  __syncthreads();
  if (threadIdx.x == 0) slot[0] = atomicAdd(work + index, 1);
  __syncthreads();
  return slot[0];
}
__device__ __forceinline__ int claim_warp(int* work, int index) {
  int item = 0;
  if ((threadIdx.x & 31) == 0) item = atomicAdd(work + index, 1);
  return __shfl_sync(FULL, item, 0);
}
// Every block, last: the block that exits last zeroes the counters (and `scratch` words) for the
// next launch and, in a send launch, counts the call as finished.
template <class P> __device__ void exit_block(const P& p, int* scratch, int scratch_words, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    flag[0] = atomicAdd(p.work + WORK_EXITED, 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (flag[0]) {
    __threadfence();
    for (int i = threadIdx.x; i < scratch_words; i += blockDim.x) scratch[i] = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int i = 0; i < WORK_WORDS; ++i) p.work[i] = 0;
      if (p.phases & SEND) p.calls[0] += 1;
    }
  }
}
// A warp copies `bytes` (a multiple of 16) from src to dst, 16 bytes a lane, four loads in flight.
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int bytes, bool bypass_l1) {
  const int vectors = bytes >> 4, lane = threadIdx.x & 31;
  int4* d = (int4*)dst;
  const int4* s = (const int4*)src;
  int i = lane;
  for (; i + 96 < vectors; i += 128) {
    int4 a, b, c, e;
    if (bypass_l1) { a = load_l2(s + i); b = load_l2(s + i + 32); c = load_l2(s + i + 64); e = load_l2(s + i + 96); }
    else { a = __ldg(s + i); b = __ldg(s + i + 32); c = __ldg(s + i + 64); e = __ldg(s + i + 96); }
    d[i] = a; d[i + 32] = b; d[i + 64] = c; d[i + 96] = e;
  }
  for (; i < vectors; i += 32) d[i] = bypass_l1 ? load_l2(s + i) : __ldg(s + i);
}
"""

_DISPATCH = r"""
// A warp: one row (bfloat16, `hidden` channels) cast to e4m3 into `row`, its scales into `scales`
// (scale = max(amax, AMAX_FLOOR) / E4M3_MAX, a power of two above with round_scale; values x * (1 / scale)).
__device__ void cast_row_fp8(const bf16_t* x, int hidden, bool round_scale, unsigned char* row, float* scales) {
  const int lane = threadIdx.x & 31, groups = hidden / FP8_GROUP;
  for (int g0 = 0; g0 < groups; g0 += 4) {
    const int g = g0 + (lane >> 3), c = g * FP8_GROUP + (lane & 7) * 16;
    float v[16];
    float amax = AMAX_FLOOR;
    if (g < groups) {
      const int4 a = __ldg((const int4*)(x + c)), b = __ldg((const int4*)(x + c + 8));
      const u32 w[8] = {(u32)a.x, (u32)a.y, (u32)a.z, (u32)a.w, (u32)b.x, (u32)b.y, (u32)b.z, (u32)b.w};
      #pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        amax = fmaxf(amax, fmaxf(fabsf(v[2 * i]), fabsf(v[2 * i + 1])));
      }
    }
    amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 4));
    float scale = __fdiv_rn(amax, E4M3_MAX);
    if (round_scale) {
      u32 bits = __float_as_uint(scale);
      if (bits & 0x7fffffu) bits = (bits & 0xff800000u) + 0x800000u;
      scale = __uint_as_float(bits);
    }
    const float inverse = __frcp_rn(scale);
    if (g < groups) {
      u32 out[4];
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        unsigned short lo, hi;
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(__fmul_rn(v[4 * i + 1], inverse)), "f"(__fmul_rn(v[4 * i], inverse)));
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(__fmul_rn(v[4 * i + 3], inverse)), "f"(__fmul_rn(v[4 * i + 2], inverse)));
        out[i] = (u32)lo | ((u32)hi << 16);
      }
      *(int4*)(row + c) = make_int4(out[0], out[1], out[2], out[3]);
      if ((lane & 7) == 0) scales[g] = scale;
    }
  }
}

namespace xmoe { namespace low_latency {
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM) dispatch(const DispatchParams p) {
  __shared__ int sent_to[MAX_EXPERTS];  // this rank's entries per expert
  __shared__ int first[MAX_RANKS + 1];
  __shared__ int flag[2];
  const int tid = threadIdx.x, lane = tid & 31;
  const int R = p.num_ranks, E = p.num_experts, L = E / R, K = p.num_topk, H = p.hidden, M = p.max_tokens;
  const int groups = H / FP8_GROUP, entries = p.num_tokens * K;
  const long long seq = launch_call(p);
  const int parity = seq & 1;
  long long* signals = (long long*)((char*)p.signals + parity * p.control_half_bytes);
  int* meta = (int*)((char*)p.meta + parity * p.control_half_bytes);
  unsigned char* slots = p.slots + parity * p.data_half_bytes;
  float* slot_scales = (float*)((char*)p.slot_scales + parity * p.data_half_bytes);
  int* slot_src_idx = (int*)((char*)p.slot_src_idx + parity * p.data_half_bytes);
  long long* counts = (long long*)((char*)p.counts + parity * p.data_half_bytes);  // [L, R]
  if (p.phases & SEND) {
    publish_shape(p, meta, signals, seq);
    for (int e = tid; e < E; e += blockDim.x) sent_to[e] = 0;
    __syncthreads();
    for (int i = tid; i < entries; i += blockDim.x) {
      const long long e = p.topk_idx[i];
      if (e >= E) { if (blockIdx.x == 0) report_error(p.errors, ERR_EXPERT_ID, i); }
      else if (e >= 0) atomicAdd(&sent_to[e], 1);
    }
    __syncthreads();
    if (blockIdx.x == 0)  // the experts this rank sends nothing: their count now
      for (int e = tid; e < E; e += blockDim.x)
        if (sent_to[e] == 0) store_relaxed(at_peer(counts, p.peers, e / L) + (e % L) * R + p.rank, seq << 32);
    for (int item = claim_warp(p.work, WORK_NEXT); item < entries; item = claim_warp(p.work, WORK_NEXT)) {
      const long long e = p.topk_idx[item];
      if (e < 0 || e >= E) continue;
      int slot = 0;  // entries before this one naming e: rows of a source arrive in its order
      for (int base = 0; base < item; base += 32) {
        const int j = base + lane;
        slot += __popc(__ballot_sync(FULL, j < item && p.topk_idx[j] == e));
      }
      const int dst = e / L, local = e % L, token = item / K;
      const long long index = ((long long)local * R + p.rank) * M + slot;
      unsigned char* row = at_peer(slots, p.peers, dst) + index * p.slot_bytes;
      if (p.fp8) cast_row_fp8(p.x + (long long)token * H, H, p.round_scale, row,
                              at_peer(slot_scales, p.peers, dst) + index * groups);
      else warp_copy(row, p.x + (long long)token * H, 2 * H, false);
      if (lane == 0) at_peer(slot_src_idx, p.peers, dst)[index] = token;
      __syncwarp();
      if (lane == 0) {
        SCOPE_FENCE();
        const int done = add_acq_rel(p.expert_sent + e, 1) + 1;
        if (done == sent_to[e])
          store_release(at_peer(counts, p.peers, dst) + local * R + p.rank, (seq << 32) | done);
      }
    }
  }
  if (p.phases & RECEIVE) {
    if (peers_agree(p, meta, signals, seq, flag)) {
      const int row_bytes = p.fp8 ? H : 2 * H, warps = blockDim.x >> 5, warp = tid >> 5;
      const int packed = p.recv_packed_scales != nullptr, rows_per_expert = R * M;
      for (int local = claim_block(p.work, WORK_NEXT_SECOND, flag + 1); local < L;
           local = claim_block(p.work, WORK_NEXT_SECOND, flag + 1)) {
        if (tid < R) {
          long long value = 0;
          if (!wait_tag(counts + local * R + tid, seq, 32, p.timeout_ns, &value)) {
            report_error(p.errors, ERR_TIMEOUT + tid, 0);
            value = 0;
          }
          first[tid + 1] = (int)(value & 0xffffffffLL);
        }
        __syncthreads();
        if (tid == 0) {
          first[0] = 0;
          for (int s = 0; s < R; ++s) first[s + 1] += first[s];
          p.recv_count[local] = first[R];
          if (p.recv_stats != nullptr) p.recv_stats[local] += first[R];
        }
        __syncthreads();
        if (tid < R)
          p.recv_layout_range[local * R + tid] = ((long long)first[tid] << 32) | (first[tid + 1] - first[tid]);
        for (int r = warp; r < first[R]; r += warps) {
          int src = 0;
          while (first[src + 1] <= r) ++src;
          const long long index = ((long long)local * R + src) * M + (r - first[src]);
          const long long out = (long long)local * rows_per_expert + r;
          warp_copy(p.recv_x + out * row_bytes, slots + index * p.slot_bytes, row_bytes, true);
          if (p.fp8 && !packed) {
            for (int g = lane; g < groups; g += 32) p.recv_scales[out * groups + g] = __ldcg(slot_scales + index * groups + g);
          } else if (packed) {  // UE8M0: a power-of-two scale's biased exponent, four a word
            for (int w = lane; w < groups / 4; w += 32) {
              int word = 0;
              for (int b = 0; b < 4; ++b)
                word |= ((__float_as_uint(__ldcg(slot_scales + index * groups + 4 * w + b)) >> 23) & 0xff) << (8 * b);
              p.recv_packed_scales[out * (groups / 4) + w] = word;
            }
          }
          if (lane == 0) p.recv_src_info[out] = __ldcg(slot_src_idx + index);
        }
      }
    }
  }
  exit_block(p, p.expert_sent, (p.phases & SEND) ? E : 0, flag);
}
"""

_COMBINE = r"""
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM) combine(const CombineParams p) {
  __shared__ int first[MAX_RANKS + 1];
  __shared__ int flag[2];
  const int tid = threadIdx.x, lane = tid & 31, warps = blockDim.x >> 5, warp = tid >> 5;
  const int R = p.num_ranks, E = p.num_experts, L = E / R, K = p.num_topk, H = p.hidden, M = p.max_tokens;
  const long long seq = launch_call(p);
  const int parity = seq & 1;
  long long* signals = (long long*)((char*)p.signals + parity * p.control_half_bytes);
  int* meta = (int*)((char*)p.meta + parity * p.control_half_bytes);
  unsigned char* slots = p.slots + parity * p.data_half_bytes;                       // [E, M, slot]
  long long* flags = (long long*)((char*)p.flags + parity * p.data_half_bytes);     // [E]
  if (p.phases & SEND) {
    publish_shape(p, meta, signals, seq);
    for (int local = claim_block(p.work, WORK_NEXT, flag + 1); local < L;
         local = claim_block(p.work, WORK_NEXT, flag + 1)) {
      if (tid < R) first[tid] = (int)(p.layout_range[local * R + tid] >> 32);
      if (tid == R - 1) first[R] = first[tid] + (int)(p.layout_range[local * R + tid] & 0xffffffffLL);
      __syncthreads();
      const long long expert = (long long)p.rank * L + local;
      for (int r = warp; r < first[R]; r += warps) {
        int src = 0;
        while (first[src + 1] <= r) ++src;
        const long long row = (long long)local * R * M + r;
        unsigned char* to = at_peer(slots, p.peers, src) + (expert * M + p.src_info[row]) * p.slot_bytes;
        warp_copy(to, p.x + row * H, 2 * H, false);
      }
      __syncthreads();
      if (tid < R) {
        SCOPE_FENCE();
        store_release(at_peer(flags, p.peers, tid) + expert, seq);
      }
    }
  }
  if (p.phases & RECEIVE) {
    if (peers_agree(p, meta, signals, seq, flag)) {
      // a warp a (token, 256 channels): one 16-byte load per lane and expert, all k in flight
      const int chunks = (H + 255) / 256;
      for (int item = claim_warp(p.work, WORK_NEXT_SECOND); item < p.num_tokens * chunks;
           item = claim_warp(p.work, WORK_NEXT_SECOND)) {
        const int t = item / chunks, c = (item % chunks) * 256 + lane * 8;
        long long e = -1;
        float w = 0.0f;
        if (lane < K) {
          e = p.topk_idx[(long long)t * K + lane];
          w = p.topk_weights[(long long)t * K + lane];
          long long value;
          if (e >= 0 && e < E && !wait_tag(flags + e, seq, 0, p.timeout_ns, &value))
            report_error(p.errors, ERR_TIMEOUT + e / L, 0);
        }
        __syncwarp();
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k0 = 0; k0 < K; k0 += 8) {
          int4 v[8];
          #pragma unroll
          for (int j = 0; j < 8; ++j) {
            const long long ek = __shfl_sync(FULL, e, (k0 + j) & 31);
            const bool used = k0 + j < K && ek >= 0 && ek < E && c < H;
            v[j] = used ? load_l2(slots + (ek * M + t) * p.slot_bytes + 2 * c) : make_int4(0, 0, 0, 0);
          }
          #pragma unroll
          for (int j = 0; j < 8; ++j) {
            const long long ek = __shfl_sync(FULL, e, (k0 + j) & 31);
            const float wk = __shfl_sync(FULL, w, (k0 + j) & 31);
            if (k0 + j >= K || ek < 0 || ek >= E) continue;
            const u32 words[4] = {(u32)v[j].x, (u32)v[j].y, (u32)v[j].z, (u32)v[j].w};
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(wk, __uint_as_float(words[i] << 16)));
              acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(wk, __uint_as_float(words[i] & 0xffff0000u)));
            }
          }
        }
        if (c < H)
          *(int4*)(p.out + (long long)t * H + c) = make_int4(pack_bf16x2(acc[0], acc[1]), pack_bf16x2(acc[2], acc[3]),
                                                             pack_bf16x2(acc[4], acc[5]), pack_bf16x2(acc[6], acc[7]));
      }
    }
  }
  exit_block(p, nullptr, 0, flag);
}
} }  // namespace xmoe::low_latency
"""


#: The memory scope of the protocol's fences, releases and acquires: "gpu" when every peer
#: runs on this GPU (PEs sharing it), "sys" when some are on other GPUs (NVLink).
SCOPES = {"gpu": "__threadfence", "sys": "__threadfence_system"}
#: The kernels' names (C++, so that profilers show ``...::dispatch`` as DeepEP's kernels).
DISPATCH_KERNEL, COMBINE_KERNEL = "xmoe::low_latency::dispatch", "xmoe::low_latency::combine"


def source(scope: str) -> str:
    """The CUDA C of both kernels for memory ``scope`` (:data:`SCOPES`), constants from their owners."""
    constants = dict(SEND=SEND, RECEIVE=RECEIVE, WORK_NEXT=WORK_NEXT, WORK_NEXT_SECOND=WORK_NEXT_SECOND,
                     WORK_EXITED=WORK_EXITED, WORK_WORDS=WORK_WORDS, ERR_TIMEOUT=ERR_TIMEOUT,
                     ERR_MISMATCH=ERR_MISMATCH, ERR_EXPERT_ID=ERR_EXPERT_ID, FIELD_SHIFT=FIELD_SHIFT,
                     META_HEADER=META_HEADER, FP8_GROUP=FP8_GROUP, THREADS=THREADS, MIN_BLOCKS_PER_SM=MIN_BLOCKS_PER_SM,
                     MAX_EXPERTS=MAX_EXPERTS,
                     MAX_RANKS=MAX_RANKS, SCOPE=f'"{scope}"', SCOPE_FENCE=SCOPES[scope])
    defines = "".join(f"#define {name} {value}\n" for name, value in constants.items())
    defines += f"#define AMAX_FLOOR {float(AMAX_FLOOR)!r}f\n#define E4M3_MAX {float(E4M3_MAX)!r}f\n"
    return defines + PRELUDE + DISPATCH.source() + COMBINE.source() + _COMMON + _DISPATCH + _COMBINE


@lru_cache(maxsize=None)
def function(name: str, scope: str) -> Any:
    """The ``CUfunction`` of kernel ``name`` (:data:`DISPATCH_KERNEL` or :data:`COMBINE_KERNEL`) for
    ``scope``, compiled once a process (from CuPy's disk cache after the first)."""
    from cuda.bindings import driver

    from xmoe.kernels.build import compile_kernel, current_device

    kernel = compile_kernel(source(scope), name, f"sm_{current_device().compute_capability}")
    return driver.CUfunction(kernel.kernel.ptr)
