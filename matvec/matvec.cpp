// One row of activations times a weight matrix, for decoding on AVX-512 CPUs: y = W x.
//
// Decoding one token reads every weight once, so the speed of these products is the speed at which the
// weights stream from memory. PyTorch's own bf16 matrix-vector kernel converts every weight to float32 before
// multiplying and runs out of arithmetic (~28 GB/s per core) before memory runs out; these read the weights
// as they are stored and keep up with memory:
//   bf16: AVX512-BF16's dot product instruction (vdpbf16ps) takes 32 bf16 weights and 32 bf16 activations
//         and adds their 16 pair-sums into float32 accumulators: no conversion at all.
//   int8: 16 int8 weights become float32 (two instructions) and meet float32 activations in one fused
//         multiply-add; the row's scale multiplies the finished sum, as in PyTorch's _weight_int8pack_mm.
// Rows are shared among PyTorch's own threads (at::parallel_for); each thread reads its rows front to back,
// one row at a time, a single stream through memory (four interleaved rows measured slower). Sums are float32 throughout and rounded once to bf16, as PyTorch's kernels do; only
// the order of the additions differs (tests bound the difference against the plain PyTorch product).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t ROWS_PER_TASK = 64;  // rows a thread takes at a time: small enough to share out evenly

__attribute__((target("avx512f,avx512bw,avx512bf16")))
void bf16_rows(const uint16_t* w, const uint16_t* x, float* y, int64_t first, int64_t last, int64_t K) {
  const int64_t K128 = K / 128 * 128;
  for (int64_t r = first; r < last; ++r) {
    const uint16_t* w0 = w + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < K128; k += 128) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w0 + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w0 + k + 64), (__m512bh)_mm512_loadu_si512(x + k + 64));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w0 + k + 96), (__m512bh)_mm512_loadu_si512(x + k + 96));
    }
    for (; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFF : (__mmask32)((1ull << (K - k)) - 1);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mask, w0 + k), (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k));
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline __m512 widen(const int8_t* p) {  // 16 int8 -> 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void int8_rows(const int8_t* w, const float* x, const float* scales, float* y, int64_t first, int64_t last,
               int64_t K) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t r = first; r < last; ++r) {
    const int8_t* w0 = w + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < K64; k += 64) {
      a0 = _mm512_fmadd_ps(widen(w0 + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(widen(w0 + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(widen(w0 + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(widen(w0 + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w0 + k)));
      a0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + k), a0);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * scales[r];
  }
}

void check(const at::Tensor& x, const at::Tensor& w, at::ScalarType w_dtype) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "matvec: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == w_dtype, "matvec: wrong dtypes");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x.numel() == w.size(1), "matvec: x (K,) and contiguous W (N, K)");
}

}  // namespace

// y (N,) bf16 = W (N, K) bf16 @ x (K,) bf16
at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& w) {
  check(x, w, at::kBFloat16);
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({N}, x.options().dtype(at::kFloat));
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, ROWS_PER_TASK, [&](int64_t first, int64_t last) { bf16_rows(wp, xp, yp, first, last, K); });
  return y.to(at::kBFloat16);
}

// y (N,) bf16 = (W (N, K) int8 @ x (K,)) * scales (N,)
at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check(x, w, at::kChar);
  TORCH_CHECK(scales.numel() == w.size(0), "matvec: one scale per row");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor xf = x.to(at::kFloat).contiguous(), sf = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({N}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float *xp = xf.data_ptr<float>(), *sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, ROWS_PER_TASK, [&](int64_t first, int64_t last) { int8_rows(wp, xp, sp, yp, first, last, K); });
  return y.to(at::kBFloat16);
}

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_matvec", &bf16_matvec, "W (N, K) bf16 @ x (K,) bf16 -> (N,) bf16");
  m.def("int8_matvec", &int8_matvec, "(W (N, K) int8 @ x (K,) bf16) * scales (N,) -> (N,) bf16");
  m.def("supported", &supported, "this CPU has the instructions these kernels use");
}
