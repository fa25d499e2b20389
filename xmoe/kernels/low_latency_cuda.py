"""The low-latency dispatch and combine kernels as generated CUDA C: the GPU's store path.

The same protocol as ``kernels/low_latency.py`` (its Numba twin, which the simulator and
the put path run), written for latency: a block a token (its row read, and cast, once for all
its top-k entries), 16-byte vector stores through peer pointers, the FP8 cast fused into the
send, and a signal per (expert, source) instead of one per rank after every token.

Dispatch, ``SEND``: block 0 writes this rank's call shape into every peer's meta row and
raises its per-rank signal (a receiver checks the shape before it reads anything). Each
block counts this rank's tokens per expert in shared memory; experts it sends nothing
get their count (0) at once. A block takes a token: a warp an entry numbers the entry's slot
(the entries before it naming the same expert: a ballot over ``topk_idx``); the block reads the
row once (cast to FP8 once on the way: 16 channels a lane, 8 lanes a 128-channel group, the warps
taking turns at the groups) and stores it, its scales and its source token into the owner's slot
``(local expert, this rank, slot)`` of every entry; then a thread an entry counts it sent for its
expert, and the one that counts an expert's last entry raises the expert's count word in the
owner: ``(call << 32) | count``. ``RECEIVE``: once every peer's
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
#: a dispatch has 128 tokens (1024 entries) and 128 local experts: 128 blocks give a block a
#: token (a warp an entry's slot) and a block an expert.
THREADS = 256
#: Blocks an SM must hold (``__launch_bounds__``): 128 blocks on the 66 SMs of half an H200.
#: Without it NVRTC 13.5 capped the dispatch kernel at 64 registers and spilled 40 bytes
#: (13.0 did not); with it both give 80 registers and no spills.
MIN_BLOCKS_PER_SM = 3
#: Experts the dispatch counts in shared memory, and ranks the kernels keep counts of there.
MAX_EXPERTS = 1024
MAX_RANKS = 64
#: Top-k entries a token may have (a lane of a warp each in combine, a shared slot each in dispatch).
MAX_TOPK = 32

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
// A warp: 16 channels a lane from channel c of a bfloat16 row, cast to e4m3 (8 lanes a 128-channel
// group, the group's scale = max(amax, AMAX_FLOOR) / E4M3_MAX, a power of two above with
// round_scale; values x * (1 / scale)) into *packed, the scale into *scale. Every lane of the warp
// calls it (the amax is shuffled among a group's lanes); `valid` false: a lane past the row.
__device__ __forceinline__ void cast16_fp8(const bf16_t* x, int c, bool valid, bool round_scale, int4* packed,
                                           float* scale_out) {
  float v[16];
  float amax = AMAX_FLOOR;
  if (valid) {
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
  u32 out[4] = {0u, 0u, 0u, 0u};
  if (valid) {
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned short lo, hi;
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(__fmul_rn(v[4 * i + 1], inverse)), "f"(__fmul_rn(v[4 * i], inverse)));
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(__fmul_rn(v[4 * i + 3], inverse)), "f"(__fmul_rn(v[4 * i + 2], inverse)));
      out[i] = (u32)lo | ((u32)hi << 16);
    }
  }
  *packed = make_int4(out[0], out[1], out[2], out[3]);
  *scale_out = scale;
}

// The slot of entry k of the block's token in its expert's owner (entry_expert[k] >= 0).
__device__ __forceinline__ long long slot_index(const DispatchParams& p, const int* entry_expert,
                                                const int* entry_slot, int k) {
  const int L = p.num_experts / p.num_ranks, e = entry_expert[k];
  return ((long long)(e % L) * p.num_ranks + p.rank) * p.max_tokens + entry_slot[k];
}

// The block: one token's row into the slot of each of its entries, read once. FP8: the warps take
// turns at four 128-channel groups (a warp's cast, then one 16-byte store a lane and entry, and
// each group's scale); bfloat16: 16-byte vectors, four loads a thread in flight before its stores.
__device__ void send_row(const DispatchParams& p, const bf16_t* x, const int* entry_expert, const int* entry_slot,
                         unsigned char* slots, float* slot_scales) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int K = p.num_topk, L = p.num_experts / p.num_ranks, groups = p.hidden / FP8_GROUP;
  if (p.fp8) {
    for (int g0 = 4 * warp; g0 < groups; g0 += 4 * warps) {  // warp-uniform: the cast shuffles
      const int g = g0 + (lane >> 3), c = g * FP8_GROUP + (lane & 7) * 16;
      int4 packed;
      float scale;
      cast16_fp8(x, c, g < groups, p.round_scale, &packed, &scale);
      if (g >= groups) continue;
      for (int k = 0; k < K; ++k) {
        if (entry_expert[k] < 0) continue;
        const long long dst = entry_expert[k] / L, index = slot_index(p, entry_expert, entry_slot, k);
        *(int4*)(at_peer(slots, p.peers, dst) + index * p.slot_bytes + c) = packed;
        if ((lane & 7) == 0) at_peer(slot_scales, p.peers, dst)[index * groups + g] = scale;
      }
    }
    return;
  }
  const int vectors = p.hidden / 8;
  for (int v0 = threadIdx.x; v0 < vectors; v0 += 4 * blockDim.x) {
    int4 value[4];
    #pragma unroll
    for (int u = 0; u < 4; ++u)
      if (v0 + u * (int)blockDim.x < vectors) value[u] = __ldg((const int4*)x + v0 + u * blockDim.x);
    for (int k = 0; k < K; ++k) {
      if (entry_expert[k] < 0) continue;
      const long long dst = entry_expert[k] / L, index = slot_index(p, entry_expert, entry_slot, k);
      int4* row = (int4*)(at_peer(slots, p.peers, dst) + index * p.slot_bytes);
      #pragma unroll
      for (int u = 0; u < 4; ++u)
        if (v0 + u * (int)blockDim.x < vectors) row[v0 + u * blockDim.x] = value[u];
    }
  }
}

namespace xmoe { namespace low_latency {
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM) dispatch(const DispatchParams p) {
  __shared__ int sent_to[MAX_EXPERTS];  // this rank's entries per expert
  __shared__ int first[MAX_RANKS + 1];
  __shared__ int flag[2];
  __shared__ int entry_expert[MAX_TOPK], entry_slot[MAX_TOPK];  // the block's token: -1 for an entry it skips
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
    const int warps = blockDim.x >> 5, warp = tid >> 5;
    for (int token = claim_block(p.work, WORK_NEXT, flag + 1); token < p.num_tokens;
         token = claim_block(p.work, WORK_NEXT, flag + 1)) {
      for (int k = warp; k < K; k += warps) {  // a warp an entry: its expert and slot
        const int item = token * K + k;
        const long long e = p.topk_idx[item];
        int slot = 0;  // entries before this one naming e: rows of a source arrive in its order
        if (e >= 0 && e < E)
          for (int base = 0; base < item; base += 32) {
            const int j = base + lane;
            slot += __popc(__ballot_sync(FULL, j < item && p.topk_idx[j] == e));
          }
        if (lane == 0) {
          entry_expert[k] = e >= 0 && e < E ? (int)e : -1;
          entry_slot[k] = slot;
        }
      }
      __syncthreads();
      send_row(p, p.x + (long long)token * H, entry_expert, entry_slot, slots, slot_scales);
      if (tid < K && entry_expert[tid] >= 0)
        at_peer(slot_src_idx, p.peers, entry_expert[tid] / L)[slot_index(p, entry_expert, entry_slot, tid)] = token;
      __syncthreads();  // every thread's stores of the token, then a fence and count an entry
      if (tid < K && entry_expert[tid] >= 0) {
        const int e = entry_expert[tid], dst = e / L, local = e % L;
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
                     MAX_EXPERTS=MAX_EXPERTS, MAX_TOPK=MAX_TOPK,
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
