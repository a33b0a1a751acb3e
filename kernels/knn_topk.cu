// Exact cosine k-NN building blocks for fastmem.kernels.knn_cuda, compiled at run time by CuPy
// (RawModule, NVRTC) and checked offline with `nvcc --ptx`.
//
// The host side computes similarity tiles (queries x references) with a cuBLAS GEMM and hands each
// tile to `topk_tile_*`, which merges it into a running per-query top-K list held in global memory:
// the full queries x references matrix never exists. Ranking everywhere: similarity descending,
// ties broken by the smaller (global) reference index.
//
// Kernels, one per element type (_f32 float, _f16 IEEE half, _bf16 bfloat16; 16-bit values travel
// as raw `unsigned short` bits so that no CUDA header is needed under NVRTC):
//   inv_norms_T          1 / max(||x_r||, 1e-12) per row, in one fixed summation order
//   scale_rows_TI_TO     out_r = cast_TO(x_r * inv_r) with zero rows as padding: GEMM operands
//   topk_tile_T          merge a similarity tile into every row's running top-K
//   rerank_T             canonical fp32 similarity of every (query, candidate) pair
//   exact_tile_T         canonical fp32 similarities of some queries against a reference range
// The canonical similarity is dot(q_hat, r) * inv_r, summed by one warp in one fixed order
// (`canonical_dot`), so re-ranked and brute-force similarities are bitwise identical and the result
// does not depend on tile sizes, chunking or the GEMM's precision.

#define FULL_MASK 0xffffffffu
#define SENTINEL_INDEX 0x7fffffffffffffffLL

// topk_tile: 128 threads per query row; each thread reads 16 values per round (two 16-byte loads
// for 16-bit tiles, four for fp32), so a round covers 2048 columns. Values above the row's current
// K-th best go to a shared candidate buffer that is sorted and merged into the list when it fills
// and at the end of the row. TOPK_KMAX must match KMAX in knn_cuda.py.
#define TOPK_THREADS 128
#define TOPK_ITEMS 16
#define TOPK_GROUP (TOPK_THREADS * 8)
#define TOPK_ROUND (TOPK_THREADS * TOPK_ITEMS)
#define TOPK_CAP 1024
#define TOPK_KMAX 512

#define WARPS_PER_BLOCK 8  // inv_norms, rerank, exact_tile: 256 threads, one warp per item

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
  return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ unsigned short float_to_bf16(float f) {
  // Round to nearest even by hand: cvt.rn.bf16.f32 needs sm_80 and this file also serves older GPUs.
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

// Element types: how a value loads as fp32, stores from fp32, and loads 8 at a time (16-byte aligned).
struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(T x) { return x; }
  static __device__ __forceinline__ T store(float f) { return f; }
  static __device__ __forceinline__ void load8(const T* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};

template <bool BRAIN>  // false: IEEE half, true: bfloat16
struct Bits16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(T x) { return BRAIN ? bf16_to_float(x) : half_to_float(x); }
  static __device__ __forceinline__ T store(float f) { return BRAIN ? float_to_bf16(f) : float_to_half(f); }
  static __device__ __forceinline__ void load8(const T* p, float* v) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);  // little endian: element 2i in the low half
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = load((unsigned short)(words[i] & 0xffffu));
      v[2 * i + 1] = load((unsigned short)(words[i] >> 16));
    }
  }
};

typedef Bits16<false> F16;
typedef Bits16<true> BF16;

__device__ __forceinline__ float warp_sum(float x) {
  // Butterfly: lane l adds lane l^o, and IEEE addition is commutative, so every lane ends with the
  // same bits and the order depends on nothing but the data.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
  return x;
}

// dot(q, r) with q in fp32 and r of element type E: lane l sums elements l, l+32, ... with fma in
// increasing order, then the butterfly. Called by a whole warp; every lane gets the result.
template <class E>
__device__ __forceinline__ float canonical_dot(const float* q, const typename E::T* r, int d, int lane) {
  float acc = 0.0f;
  for (int j = lane; j < d; j += 32) acc = fmaf(q[j], E::load(r[j]), acc);
  return warp_sum(acc);
}

// ---------------------------------------------------------------------------------------------
// Row norms and scaled copies.

template <class E>
__device__ __forceinline__ void inv_norms_body(const typename E::T* x, long long n, int d, float* out) {
  const long long row = (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // the whole warp leaves together: `row` is uniform across it
  const typename E::T* xr = x + row * d;
  float ss = 0.0f;
  for (int j = lane; j < d; j += 32) {
    const float a = E::load(xr[j]);
    ss = fmaf(a, a, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) out[row] = 1.0f / fmaxf(sqrtf(ss), 1e-12f);  // as F.normalize's eps
}

// One block per output row: rows below n_valid are x[row0 + r] * inv[row0 + r] rounded to EO, the
// rest are zero (padding that keeps GEMM tiles a multiple of 8 wide).
template <class EI, class EO>
__device__ __forceinline__ void scale_rows_body(const typename EI::T* x, long long row0, long long n_valid,
                                                const float* inv, typename EO::T* out, int d) {
  const long long r = blockIdx.x;
  typename EO::T* o = out + r * d;
  if (r < n_valid) {
    const typename EI::T* xr = x + (row0 + r) * d;
    const float s = inv[row0 + r];
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = EO::store(EI::load(xr[j]) * s);
  } else {
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = EO::store(0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming top-K.

struct TopkShared {
  float buf_v[TOPK_CAP];  // candidates of the current rows' rounds, unsorted until a merge
  long long buf_i[TOPK_CAP];
  float st_v[2][TOPK_KMAX];  // the running list, best first; two copies so a merge never reads
  long long st_i[2][TOPK_KMAX];  // what it writes
  int count;  // candidates claimed in the buffer (may exceed TOPK_CAP: the excess was not stored)
};

__device__ __forceinline__ bool ranks_before(float va, long long ia, float vb, long long ib) {
  return va > vb || (va == vb && ia < ib);
}

// Bitonic sort of buf[0, p), p a power of two, best first. Ends synchronized.
__device__ void sort_buffer(TopkShared& sh, int p) {
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (p >> 1); t += TOPK_THREADS) {
        const int i = 2 * t - (t & (stride - 1));  // lower element of this thread's pair
        const int j = i + stride;
        const float vi = sh.buf_v[i], vj = sh.buf_v[j];
        const long long ii = sh.buf_i[i], ij = sh.buf_i[j];
        const bool forward = (i & size) == 0;
        if (forward ? ranks_before(vj, ij, vi, ii) : ranks_before(vi, ii, vj, ij)) {
          sh.buf_v[i] = vj; sh.buf_v[j] = vi;
          sh.buf_i[i] = ij; sh.buf_i[j] = ii;
        }
      }
      __syncthreads();
    }
  }
}

// Merges buf[0, n) into list `cur` (K entries, best first) and returns the index of the list now
// holding the best K. Every entry finds its rank in the merged order by a binary search in the other
// list; reference indices are distinct, so ranks never collide (equal sentinels sit in one list at
// distinct positions). Called by all threads alike after a barrier; ends synchronized, buffer empty.
__device__ int merge_buffer(TopkShared& sh, int n, int K, int cur) {
  int p = 1;
  while (p < n) p <<= 1;
  for (int j = n + threadIdx.x; j < p; j += TOPK_THREADS) {
    sh.buf_v[j] = neg_inf();
    sh.buf_i[j] = SENTINEL_INDEX;
  }
  __syncthreads();
  sort_buffer(sh, p);
  const int nxt = cur ^ 1;
  for (int j = threadIdx.x; j < K; j += TOPK_THREADS) {
    const float v = sh.st_v[cur][j];
    const long long id = sh.st_i[cur][j];
    int lo = 0, hi = n;  // candidates that rank before this entry
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (ranks_before(sh.buf_v[mid], sh.buf_i[mid], v, id)) lo = mid + 1; else hi = mid;
    }
    if (j + lo < K) { sh.st_v[nxt][j + lo] = v; sh.st_i[nxt][j + lo] = id; }
  }
  const int m = n < K ? n : K;
  for (int j = threadIdx.x; j < m; j += TOPK_THREADS) {
    const float v = sh.buf_v[j];
    const long long id = sh.buf_i[j];
    int lo = 0, hi = K;  // list entries that rank before this candidate
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (ranks_before(sh.st_v[cur][mid], sh.st_i[cur][mid], v, id)) lo = mid + 1; else hi = mid;
    }
    if (j + lo < K) { sh.st_v[nxt][j + lo] = v; sh.st_i[nxt][j + lo] = id; }
  }
  if (threadIdx.x == 0) sh.count = 0;  // everyone read `count` before the first barrier above
  __syncthreads();
  return nxt;
}

// Block b merges tile row b (n_cols valid values, row stride ld: a multiple of 8, >= n_cols, rows
// 16-byte aligned) into list row state_row0 + b of best_v/best_i (K entries each, best first,
// padded with (-inf, SENTINEL_INDEX)). Column c is reference col_offset + c. A value enters the
// candidate buffer only if it ranks before the current K-th entry (ties by index included, as a
// value retried after a mid-round merge may tie with a later column of the same round).
template <class E>
__device__ __forceinline__ void topk_tile_body(TopkShared& sh, const typename E::T* sims, long long ld, int n_cols,
                                               long long col_offset, float* best_v, long long* best_i, int K,
                                               long long state_row0) {
  if (K < 1 || K > TOPK_KMAX) return;  // the host checks; never index past the shared lists
  const int tid = threadIdx.x, lane = tid & 31;
  const typename E::T* srow = sims + (long long)blockIdx.x * ld;
  float* bv = best_v + (state_row0 + blockIdx.x) * (long long)K;
  long long* bi = best_i + (state_row0 + blockIdx.x) * (long long)K;
  for (int j = tid; j < K; j += TOPK_THREADS) { sh.st_v[0][j] = bv[j]; sh.st_i[0][j] = bi[j]; }
  if (tid == 0) sh.count = 0;
  __syncthreads();
  int cur = 0;
  float theta = sh.st_v[0][K - 1];  // the K-th entry: the bar a value must clear
  long long theta_i = sh.st_i[0][K - 1];
  int count = 0;
  for (int base = 0; base < n_cols; base += TOPK_ROUND) {
    float v[TOPK_ITEMS];
    const long long col0 = col_offset + base + tid * 8;  // reference of v[e]: col0 + (e>>3)*GROUP + (e&7)
    unsigned int pending = 0u;  // bit e: v[e] is a valid column not yet stored or rejected
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      const int c = base + g * TOPK_GROUP + tid * 8;
      if (c < n_cols) {
        E::load8(srow + c, v + 8 * g);  // c + 7 < ld: ld is a multiple of 8 above n_cols
#pragma unroll
        for (int e = 0; e < 8; ++e) if (c + e < n_cols) pending |= 1u << (8 * g + e);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[8 * g + e] = neg_inf();
      }
    }
    while (true) {
      unsigned int want = 0u;
#pragma unroll
      for (int e = 0; e < TOPK_ITEMS; ++e) {
        const bool above = v[e] > theta || (v[e] == theta && col0 + (e >> 3) * TOPK_GROUP + (e & 7) < theta_i);
        if (((pending >> e) & 1u) && above) want |= 1u << e;
      }
      pending = want;  // ranked after the K-th entry now means for good: the bar only rises
      if (__any_sync(FULL_MASK, want != 0u)) {
#pragma unroll
        for (int e = 0; e < TOPK_ITEMS; ++e) {
          const bool take = (want >> e) & 1u;
          const unsigned int mask = __ballot_sync(FULL_MASK, take);
          if (mask == 0u) continue;  // uniform across the warp
          int first = 0;
          if (lane == 0) first = atomicAdd(&sh.count, __popc(mask));  // one atomic per warp
          first = __shfl_sync(FULL_MASK, first, 0);
          if (take) {
            const int pos = first + __popc(mask & ((1u << lane) - 1u));
            if (pos < TOPK_CAP) {
              sh.buf_v[pos] = v[e];
              sh.buf_i[pos] = col0 + (e >> 3) * TOPK_GROUP + (e & 7);
              pending &= ~(1u << e);
            }  // else: the buffer is full; the value stays pending and is retried after the merge
          }
        }
      }
      __syncthreads();
      count = sh.count;
      __syncthreads();  // every thread has read `count` before a merge resets it or atomics move it
      if (count < TOPK_CAP) break;
      cur = merge_buffer(sh, TOPK_CAP, K, cur);
      theta = sh.st_v[cur][K - 1];
      theta_i = sh.st_i[cur][K - 1];
      count = 0;
    }
  }
  if (count > 0) cur = merge_buffer(sh, count, K, cur);
  for (int j = tid; j < K; j += TOPK_THREADS) { bv[j] = sh.st_v[cur][j]; bi[j] = sh.st_i[cur][j]; }
}

// ---------------------------------------------------------------------------------------------
// Canonical similarities.

// Block q: similarity of query q to each of its kc candidates (global indices; chunk rows start at
// ref_start); a candidate outside the chunk gets -inf.
template <class E>
__device__ __forceinline__ void rerank_body(const float* qhat, int d, const typename E::T* ref, const float* ref_inv,
                                            long long ref_start, long long ref_rows, const long long* cand, int kc,
                                            float* out) {
  const long long q = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* qr = qhat + q * d;
  for (int c = warp; c < kc; c += WARPS_PER_BLOCK) {
    const long long r = cand[q * kc + c] - ref_start;  // uniform across the warp
    float s = neg_inf();
    if (r >= 0 && r < ref_rows) s = canonical_dot<E>(qr, ref + r * d, d, lane) * ref_inv[r];
    if (lane == 0) out[q * kc + c] = s;
  }
}

// Block (x, y): query qids[qid0 + y] against chunk rows row0 + x*8 + warp, written to
// out[y * ld + column]; the same arithmetic as rerank_body.
template <class E>
__device__ __forceinline__ void exact_tile_body(const float* qhat, const long long* qids, long long qid0, int d,
                                                const typename E::T* ref, const float* ref_inv, long long row0,
                                                int n_cols, float* out, long long ld) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col = blockIdx.x * WARPS_PER_BLOCK + warp;
  if (col >= n_cols) return;  // uniform across the warp
  const long long q = qids[qid0 + blockIdx.y];
  const long long r = row0 + col;
  const float s = canonical_dot<E>(qhat + q * d, ref + r * d, d, lane) * ref_inv[r];
  if (lane == 0) out[(long long)blockIdx.y * ld + col] = s;
}

// ---------------------------------------------------------------------------------------------
// Entry points.

#define DEFINE_PER_TYPE(SUFFIX, E)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) inv_norms_##SUFFIX(const E::T* x, long long n, int d,  \
                                                                       float* out) {                      \
    inv_norms_body<E>(x, n, d, out);                                                                      \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(TOPK_THREADS)                                              \
      topk_tile_##SUFFIX(const E::T* sims, long long ld, int n_cols, long long col_offset, float* best_v,  \
                         long long* best_i, int K, long long state_row0) {                                \
    __shared__ TopkShared sh;                                                                             \
    topk_tile_body<E>(sh, sims, ld, n_cols, col_offset, best_v, best_i, K, state_row0);                   \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256)                                                       \
      rerank_##SUFFIX(const float* qhat, int d, const E::T* ref, const float* ref_inv, long long ref_start, \
                      long long ref_rows, const long long* cand, int kc, float* out) {                    \
    rerank_body<E>(qhat, d, ref, ref_inv, ref_start, ref_rows, cand, kc, out);                            \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256)                                                       \
      exact_tile_##SUFFIX(const float* qhat, const long long* qids, long long qid0, int d, const E::T* ref, \
                          const float* ref_inv, long long row0, int n_cols, float* out, long long ld) {   \
    exact_tile_body<E>(qhat, qids, qid0, d, ref, ref_inv, row0, n_cols, out, ld);                         \
  }

DEFINE_PER_TYPE(f32, F32)
DEFINE_PER_TYPE(f16, F16)
DEFINE_PER_TYPE(bf16, BF16)

#define DEFINE_SCALE(SI, EI, SO, EO)                                                                      \
  extern "C" __global__ void __launch_bounds__(128)                                                       \
      scale_rows_##SI##_##SO(const EI::T* x, long long row0, long long n_valid, const float* inv,          \
                             EO::T* out, int d) {                                                         \
    scale_rows_body<EI, EO>(x, row0, n_valid, inv, out, d);                                               \
  }

DEFINE_SCALE(f32, F32, f32, F32)
DEFINE_SCALE(f32, F32, f16, F16)
DEFINE_SCALE(f32, F32, bf16, BF16)
DEFINE_SCALE(f16, F16, f32, F32)
DEFINE_SCALE(f16, F16, f16, F16)
DEFINE_SCALE(f16, F16, bf16, BF16)
DEFINE_SCALE(bf16, BF16, f32, F32)
DEFINE_SCALE(bf16, BF16, f16, F16)
DEFINE_SCALE(bf16, BF16, bf16, BF16)
