// Decode block top-p selection in CUDA: the same semantics as the Triton `_select_kernel`
// (triton_kernels/block_topp/kernel.py, topp_search.topp_select_row), one CTA per (head, sequence).
//
// Experiment (not built by setup.py): the Triton selection is one program per (sequence, retrieval
// head) whose binary search makes 10-16 block-wide reductions, 9 us at 128K and 27 us at 512K batch 1
// on an H100. Here a thread owns VPT consecutive blocks in registers (their masses' bit patterns), a
// search step is one warp-shuffle reduction plus one __syncthreads (buffers alternate between steps),
// and the compaction is two block scans.
//
// Row r = (seq, head): block_max / block_sum [B, HR, max_blocks] float32 (stride_wb, stride_wh, 1),
// selected [B, HR, max_blocks] int32 (stride_sb, stride_sh, 1), num_selected [B, HR] (stride_nb, stride_nh).
// mass_j = block_sum[j] * exp(block_max[j] - M) / max(Z, 1); forced blocks j < num_sink_blocks and the
// last block; kept: forced, candidates with mass > tau, the ties at tau in id order while
// F + S(> tau) + ties_before * tau < top_p; all blocks when top_p >= 1, seq_len < dense_threshold or the
// candidates cannot reach top_p.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kInfBits = 0x7F800000;   // +inf's float32 bit pattern
constexpr int kNotCandidate = -2;       // below every threshold of the search (>= -1)

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) % 4 == 0, "32-bit fields only");
  constexpr int kWords = sizeof(T) / 4;
  int w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], mask);
  memcpy(&v, w, sizeof(T));
  return v;
}

// Every thread gets the same bits: a butterfly in the warp, then each thread combines the warps'
// partials in warp order. `buf` [WARPS] must not be read by a reduction still in flight.
template <int THREADS, typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* buf) {
  constexpr int kWarps = THREADS / 32;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = buf[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, buf[w]);
  return r;
}

// Exclusive prefix sum of `v` over the threads in thread order; `total` gets the sum.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_scan(int v, int* buf, int& total) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) buf[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int t = buf[w];
    before += w < warp ? t : 0;
    total += t;
  }
  return before + inclusive - v;
}

struct MaxSum { float m, z; };           // softmax normaliser: max and sum exp(. - max)
struct Totals { float forced, candidate; int smallest, largest; };
struct StepStats { float mass_at_mid; unsigned lo_gap0, hi_gap0, lo_gap1, hi_gap1; };

struct CombineMaxSum {
  __device__ MaxSum operator()(MaxSum a, MaxSum b) const {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.f};
    return {m, a.z * __expf(a.m - m) + b.z * __expf(b.m - m)};
  }
};
struct CombineTotals {
  __device__ Totals operator()(Totals a, Totals b) const {
    return {a.forced + b.forced, a.candidate + b.candidate, min(a.smallest, b.smallest), max(a.largest, b.largest)};
  }
};
struct CombineStep {
  __device__ StepStats operator()(StepStats a, StepStats b) const {
    return {a.mass_at_mid + b.mass_at_mid, min(a.lo_gap0, b.lo_gap0), min(a.hi_gap0, b.hi_gap0),
            min(a.lo_gap1, b.lo_gap1), min(a.hi_gap1, b.hi_gap1)};
  }
};

template <int THREADS, int VPT>
__global__ void __launch_bounds__(THREADS) topp_select_kernel(
    const int* __restrict__ seq_lens, const float* __restrict__ block_max, const float* __restrict__ block_sum,
    int* __restrict__ selected, int* __restrict__ num_selected,
    int64_t stride_wb, int64_t stride_wh, int64_t stride_sb, int64_t stride_sh, int64_t stride_nb,
    int64_t stride_nh, float top_p, int dense_threshold, int num_sink_blocks, int max_blocks, int block_size) {
  constexpr int kWarps = THREADS / 32;
  __shared__ MaxSum buf_norm[kWarps];
  __shared__ Totals buf_totals[kWarps];
  __shared__ StepStats buf_step[2][kWarps];
  __shared__ int buf_scan[2][kWarps];

  const int64_t head = blockIdx.x, seq = blockIdx.y;
  const float* row_max = block_max + seq * stride_wb + head * stride_wh;
  const float* row_sum = block_sum + seq * stride_wb + head * stride_wh;
  int* row_out = selected + seq * stride_sb + head * stride_sh;
  const int first = threadIdx.x * VPT;   // this thread's blocks: [first, first + VPT)

  // The stats are loaded up to max_blocks (readable whatever they hold) together with the length.
  float m[VPT], l[VPT];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = first + k;
    m[k] = j < max_blocks ? __ldg(row_max + j) : -INFINITY;
    l[k] = j < max_blocks ? __ldg(row_sum + j) : 0.f;
  }
  const int seq_len = __ldg(seq_lens + seq);
  const int num_blocks = max(min((seq_len + block_size - 1) / block_size, max_blocks), 0);
  const float row_top_p = (top_p >= 1.f || seq_len < dense_threshold) ? INFINITY : top_p;

  MaxSum norm{-INFINITY, 0.f};
#pragma unroll
  for (int k = 0; k < VPT; ++k) norm.m = first + k < num_blocks ? fmaxf(norm.m, m[k]) : norm.m;
#pragma unroll
  for (int k = 0; k < VPT; ++k) norm.z += first + k < num_blocks ? l[k] * __expf(m[k] - norm.m) : 0.f;
  norm = block_allreduce<THREADS>(norm, CombineMaxSum{}, buf_norm);
  const float global_max = num_blocks > 0 ? norm.m : 0.f;
  const float inv_total = 1.f / fmaxf(norm.z, 1.f);

  // Masses as bit patterns (non-negative floats order like their int32 bits); non-candidates kNotCandidate.
  int bits[VPT];
  Totals totals{0.f, 0.f, kInfBits, -1};
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = first + k;
    const bool valid = j < num_blocks;
    const bool forced = valid && (j < num_sink_blocks || j >= num_blocks - 1);
    const float mass = valid ? l[k] * __expf(m[k] - global_max) * inv_total : 0.f;
    const int mass_bits = __float_as_int(mass);
    bits[k] = valid && !forced ? mass_bits : kNotCandidate;
    totals.forced += forced ? mass : 0.f;
    totals.candidate += valid && !forced ? mass : 0.f;
    totals.smallest = valid && !forced ? min(totals.smallest, mass_bits) : totals.smallest;
    totals.largest = valid && !forced ? max(totals.largest, mass_bits) : totals.largest;
  }
  totals = block_allreduce<THREADS>(totals, CombineTotals{}, buf_totals);
  const float forced_mass = totals.forced;

  // tau: the bracket [lo, hi) of bit patterns keeps lo reached, hi not (topp_search.py's invariant).
  const bool forced_reach = forced_mass >= row_top_p;
  const bool reachable = forced_mass + totals.candidate >= row_top_p;
  int lo = forced_reach ? kInfBits - 1 : (reachable ? totals.smallest : -1);
  int hi = forced_reach ? kInfBits : (reachable ? totals.largest + 1 : 0);
  float mass_above = 0.f;                      // candidate mass >= hi
  int step = 0;
  while (hi - lo > 1) {
    const int mid = lo + ((hi - lo) >> 1);
    StepStats s{0.f, ~0u, ~0u, ~0u, ~0u};
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int b = bits[k];
      s.mass_at_mid += b >= mid ? __int_as_float(b) : 0.f;
      s.lo_gap0 = min(s.lo_gap0, unsigned(b) - unsigned(lo));
      s.hi_gap0 = min(s.hi_gap0, unsigned(mid) - 1u - unsigned(b));
      s.lo_gap1 = min(s.lo_gap1, unsigned(b) - unsigned(mid));
      s.hi_gap1 = min(s.hi_gap1, unsigned(hi) - 1u - unsigned(b));
    }
    s = block_allreduce<THREADS>(s, CombineStep{}, buf_step[step & 1]);
    ++step;
    const bool upper_reached = forced_mass + s.mass_at_mid >= row_top_p;
    const int new_lo = upper_reached ? mid : lo, new_hi = upper_reached ? hi : mid;
    const unsigned lo_gap = upper_reached ? s.lo_gap1 : s.lo_gap0, hi_gap = upper_reached ? s.hi_gap1 : s.hi_gap0;
    mass_above = upper_reached ? mass_above : s.mass_at_mid;
    const bool holds_any = lo_gap < unsigned(new_hi - new_lo);   // shrink to the candidate values inside
    lo = holds_any ? new_lo + int(lo_gap) : new_lo;
    hi = holds_any ? new_hi - int(hi_gap) : new_hi;
  }
  const int tau_bits = lo;
  const float tau = __int_as_float(tau_bits);
  const bool keep_all = tau_bits < 0;
  const float mass_before_ties = forced_mass + mass_above;

  // Compaction in ascending block order: ties at tau ranked first, then the kept blocks.
  int ties = 0;
#pragma unroll
  for (int k = 0; k < VPT; ++k) ties += bits[k] == tau_bits ? 1 : 0;
  int all_ties;
  int ties_before = block_exclusive_scan<THREADS>(ties, buf_scan[0], all_ties);
  unsigned keep_mask = 0;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = first + k;
    const bool valid = j < num_blocks;
    const bool forced = valid && (j < num_sink_blocks || j >= num_blocks - 1);
    const bool candidate = valid && !forced;
    const bool tie = candidate && bits[k] == tau_bits;
    const bool tie_kept = tie && mass_before_ties + float(ties_before) * tau < row_top_p;
    ties_before += tie ? 1 : 0;
    const bool keep = valid && (keep_all || forced || (candidate && bits[k] > tau_bits) || tie_kept);
    keep_mask |= keep ? (1u << k) : 0u;
  }
  int count;
  int out = block_exclusive_scan<THREADS>(__popc(keep_mask), buf_scan[1], count);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    if (keep_mask >> k & 1u) row_out[out++] = first + k;
  }
  for (int j = count + threadIdx.x; j < max_blocks; j += THREADS) row_out[j] = -1;
  if (threadIdx.x == 0) num_selected[seq * stride_nb + head * stride_nh] = count;
}

template <int THREADS, int VPT>
void launch(const torch::Tensor& seq_lens, const torch::Tensor& block_max, const torch::Tensor& block_sum,
            torch::Tensor& selected, torch::Tensor& num_selected, double top_p, int64_t dense_threshold,
            int64_t num_sink_blocks, int64_t max_blocks, int64_t block_size) {
  const dim3 grid(selected.size(1), selected.size(0));
  topp_select_kernel<THREADS, VPT><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
      seq_lens.data_ptr<int>(), block_max.data_ptr<float>(), block_sum.data_ptr<float>(),
      selected.data_ptr<int>(), num_selected.data_ptr<int>(), block_max.stride(0), block_max.stride(1),
      selected.stride(0), selected.stride(1), num_selected.stride(0), num_selected.stride(1),
      static_cast<float>(top_p), static_cast<int>(dense_threshold), static_cast<int>(num_sink_blocks),
      static_cast<int>(max_blocks), static_cast<int>(block_size));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// seq_lens [B] int32; block_max, block_sum [>=B, HR, max_blocks] float32 (unit last stride); selected
// [B, HR, max_blocks] int32 (unit last stride); num_selected [B, HR] int32. Rows of up to 32768 blocks.
void topp_select(torch::Tensor seq_lens, torch::Tensor block_max, torch::Tensor block_sum, torch::Tensor selected,
                 torch::Tensor num_selected, double top_p, int64_t dense_threshold, int64_t num_sink_blocks,
                 int64_t max_blocks, int64_t block_size) {
  TORCH_CHECK(seq_lens.dtype() == torch::kInt32 && selected.dtype() == torch::kInt32 &&
              num_selected.dtype() == torch::kInt32, "seq_lens, selected and num_selected must be int32");
  TORCH_CHECK(block_max.dtype() == torch::kFloat32 && block_sum.dtype() == torch::kFloat32,
              "block_max and block_sum must be float32");
  TORCH_CHECK(block_max.strides() == block_sum.strides() && block_max.stride(2) == 1 && selected.stride(2) == 1,
              "block_max and block_sum need the same strides, unit last stride (selected too)");
  TORCH_CHECK(selected.size(2) == max_blocks && block_max.size(2) == max_blocks, "rows of max_blocks entries");
  const at::cuda::OptionalCUDAGuard guard(selected.device());
  if (selected.size(0) == 0 || selected.size(1) == 0) return;
  if (max_blocks <= 2048) launch<256, 8>(seq_lens, block_max, block_sum, selected, num_selected, top_p, dense_threshold, num_sink_blocks, max_blocks, block_size);
  else if (max_blocks <= 4096) launch<256, 16>(seq_lens, block_max, block_sum, selected, num_selected, top_p, dense_threshold, num_sink_blocks, max_blocks, block_size);
  else if (max_blocks <= 8192) launch<256, 32>(seq_lens, block_max, block_sum, selected, num_selected, top_p, dense_threshold, num_sink_blocks, max_blocks, block_size);
  else if (max_blocks <= 16384) launch<512, 32>(seq_lens, block_max, block_sum, selected, num_selected, top_p, dense_threshold, num_sink_blocks, max_blocks, block_size);
  else if (max_blocks <= 32768) launch<1024, 32>(seq_lens, block_max, block_sum, selected, num_selected, top_p, dense_threshold, num_sink_blocks, max_blocks, block_size);
  else TORCH_CHECK(false, "rows of more than 32768 blocks are not supported, got max_blocks ", max_blocks);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topp_select", &topp_select, "decode block top-p selection (CUDA)");
}
