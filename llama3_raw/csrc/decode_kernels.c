/* One row of activations times weight matrices, y = W x, for decoding on CPUs with AVX-512 (BF16, VNNI, VBMI,
   GFNI); int4 weights back to bf16 for prompts; and the rest of a decode step (RMSNorm, RoPE, attention over the
   cache: model.py's functions of those names, see the section below).

Decoding one token reads every weight once, so the speed of these products is the speed at which the
weights stream from memory. PyTorch's own one-row products run out of arithmetic first (its bf16 product
converts each weight to float32, its int8 and int4 products too). These read the weights as stored:

  bf16: vdpbf16ps multiplies 32 bf16 weights by 32 bf16 activations and adds the 16 pair sums into float32
        lanes: no conversion. The products of two bf16 numbers are exact in float32; only the order of the
        float32 additions differs from PyTorch's.
  int8: the activations are rounded to int16, one scale per block of 32 (scale = block max / 32767), and
        vpdpwssd multiplies 32 int8 weights (widened to int16) by 32 of them into int32 lanes, exactly.
        Each block's int32 sum times its scale is added in float32; the row's scale multiplies the total.
  int4: the activations are rounded to int8, one scale per block of 32 (max / 127), as llama.cpp does, and
        vpdpbusd multiplies 64 4-bit weights (0..15, unsigned) by 64 of them into int32 lanes, exactly
        (two such products per 64 bytes of a row).
        sum_k ((q_k - 8) s + z) x_k is computed as sum_blocks s sx (dot(q, xq) - 8 sum(xq)) + z sum(x).

Rows are shared among threads in contiguous ranges (OpenMP, the runtime PyTorch itself loads); each thread
reads its rows front to back. Python passes tensors' addresses (compiled.py checks dtypes, shapes and
layouts first); the GIL is released while the product runs.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi,gfni,fma")))
#define BLOCK 32        /* activations quantized per block of this many inputs */
/* int4: how far ahead of the rows being read to ask for the bytes (into L2). Without it the int4 product read
   19 GB/s, with it 27 (PyTorch's int4 kernel 21), measured on 1.3 GB of 8192x2048 matrices, 2 threads. 8 KB ahead
   read 6-7 % more than 4 KB over the 1B shape's matrices (alternating, 14 and 12 rounds, bandwidth 31-51 GB/s;
   16 KB: 5 %). (Those were on an AMD EPYC VM; for bf16 and int8 see stream_prefetch_bytes below: there, int8 was
   slower with it, bf16 read 3 % more 4 KB ahead and 4 % less 8 or 16 KB ahead, 8 rounds, and whole bf16 steps
   with it 4 KB ahead measured alike.) */
#define INT4_PREFETCH_BYTES 8192
/* bf16 and int8: how far ahead to ask for the bytes (into L1), set when the module loads. On an Intel Xeon VM
   (2026-12-06; 8B-shaped matrices, ~1 GB of copies, 2 threads, 5 alternating rounds) 4 KB ahead took the bf16
   product from 24.9 to 29.7 GB/s and the int8 one from 19.0 to 31.0 (2 KB: 28.7, 29.4; 1 KB int8: 25.5); on the
   AMD EPYC VM of the kernels' first measurements bf16 read 3 % more 4 KB ahead and int8 read less, so there the
   distance stays 0 (the line being read: a no-op). */
static int64_t stream_prefetch_bytes = 0;

static float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static uint16_t float_to_bf16(float f) { /* round to nearest even, as PyTorch rounds; NaN stays NaN */
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* ---- bf16 ---------------------------------------------------------------------------------------------- */

AVX512 static void bf16_rows(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t first, int64_t last,
                             int64_t K) {
  for (int64_t r = first; r < last; ++r) {
    const uint16_t *row = w + r * K;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      _mm_prefetch((const char *)(row + k) + stream_prefetch_bytes, _MM_HINT_T0);
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(x + k));
      acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(row + k + 32),
                              (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < K; k += 32) { /* the last inputs, fewer than 64: masked loads read zeros past the row */
      __mmask32 mask = K - k >= 32 ? 0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(mask, row + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k));
    }
    y[r] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)));
  }
}

/* ---- int8 weights, int16 activations ------------------------------------------------------------------- */

AVX512 static __m512 load16_bf16(const uint16_t *x) { /* 16 bf16 -> 16 float32 (exact) */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

/* One block of 32 activations (bf16) as two float32 vectors, and the largest magnitude among them -- NaN if any
   is NaN or infinite, so that the block's scale is NaN and the products come out NaN, as PyTorch's would (the
   decode loop refuses non-finite logits in one sentence) instead of rounding them to some finite integer. */
#define NOT_FINITE 0x99 /* vfpclassps: quiet NaN, +infinity, -infinity, signalling NaN */
AVX512 static float load_block(const uint16_t *x, __m512 *v0, __m512 *v1) {
  *v0 = load16_bf16(x);
  *v1 = load16_bf16(x + 16);
  if (_mm512_fpclass_ps_mask(*v0, NOT_FINITE) | _mm512_fpclass_ps_mask(*v1, NOT_FINITE)) return NAN;
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(*v0), _mm512_abs_ps(*v1)));
}

/* x (K) bf16 -> xq int16 (K) and one scale per block of 32: xq = round(x / scale), scale = block max / 32767. */
AVX512 static void quantize_int16(const uint16_t *x, int64_t K, int16_t *xq, float *scales) {
  for (int64_t b = 0; b < K / BLOCK; ++b) {
    __m512 v0, v1;
    float amax = load_block(x + b * BLOCK, &v0, &v1);
    __m512 inverse = _mm512_set1_ps(amax > 0 ? 32767.0f / amax : 0);
    scales[b] = amax / 32767.0f;
    _mm256_storeu_si256((__m256i *)(xq + b * BLOCK), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inverse))));
    _mm256_storeu_si256((__m256i *)(xq + b * BLOCK + 16),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inverse))));
  }
}

AVX512 static void int8_rows(const int8_t *w, const uint16_t *row_scales, const int16_t *xq, const float *xscales,
                             uint16_t *y, int64_t first, int64_t last, int64_t K) {
  for (int64_t r = first; r < last; ++r) {
    const int8_t *row = w + r * K;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t b = 0; b + 2 <= K / BLOCK; b += 2) { /* two blocks of 32 at a time */
      const int64_t k = b * BLOCK;
      _mm_prefetch((const char *)(row + k) + stream_prefetch_bytes, _MM_HINT_T0);
      __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
      __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k + 32)));
      __m512i d0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xq + k));
      __m512i d1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(xq + k + 32));
      acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(xscales[b]), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(xscales[b + 1]), acc1);
    }
    if ((K / BLOCK) % 2) { /* an odd last block */
      const int64_t b = K / BLOCK - 1, k = b * BLOCK;
      __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
      __m512i d0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xq + k));
      acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(xscales[b]), acc0);
    }
    y[r] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) * bf16_to_float(row_scales[r]));
  }
}

/* ---- int4 weights, int8 activations -------------------------------------------------------------------- */

/* The kernel reads a row in windows of 128 inputs: 64 bytes of the plain layout (int4_layouts.py), byte j
   holding input 2j in its high half and 2j+1 in its low half. Masking the low halves gives the odd inputs in
   bytes 0..63, shifting the high halves down the even ones; so the int8 activations are kept as `even` and
   `odd` vectors in that order. vpdpbusd's lane l adds bytes 4l..4l+3: inputs 8l..8l+7 between the two, all in
   block l / 4 of the window (blocks of 32). Both products go into one int32 sum per lane, started at
   `minus8` = -8 * (the lane's eight int8 activations), so that it comes out as sum (q - 8) xq. A row's
   result is sum_blocks scale_g(b) * sx_b * that + zero_g(b) * sum_b(x), sum_b(x) of the unrounded inputs.
   A last half window (inputs a multiple of 64, not 128) is padded with zeros. */
typedef struct {
  int64_t windows;      /* ceil(K / 128) */
  int8_t *even, *odd;   /* windows * 64 each */
  int32_t *minus8;      /* windows * 16 */
  float *block_scale;   /* windows * 4: each block's activation scale, max |x| / 127 (0 past the end) */
  float *block_sum;     /* windows * 4: each block's sum of activations (all four arrays padded with zeros to
                           whole spans of 4 windows) */
} Int4Activations;

AVX512 static void prepare_int4_activations(const uint16_t *x, int64_t K, Int4Activations *a) {
  uint8_t even_index[64], odd_index[64];
  for (int j = 0; j < 64; ++j) even_index[j] = (uint8_t)(2 * j), odd_index[j] = (uint8_t)(2 * j + 1);
  const __m512i even_of = _mm512_loadu_si512(even_index), odd_of = _mm512_loadu_si512(odd_index);
  for (int64_t w = 0; w < a->windows; ++w) {
    int8_t q[128] = {0};
    for (int b = 0; b < 4; ++b) {
      const int64_t k = w * 128 + b * BLOCK;
      float scale = 0, sum = 0;
      if (k < K) {
        __m512 v0, v1;
        float amax = load_block(x + k, &v0, &v1);
        __m512 inverse = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0);
        scale = amax / 127.0f;
        sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        _mm_storeu_si128((__m128i *)(q + b * BLOCK), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inverse))));
        _mm_storeu_si128((__m128i *)(q + b * BLOCK + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inverse))));
      }
      a->block_scale[w * 4 + b] = scale;
      a->block_sum[w * 4 + b] = sum;
    }
    const __m512i first = _mm512_loadu_si512(q), second = _mm512_loadu_si512(q + 64);
    const __m512i even = _mm512_permutex2var_epi8(first, even_of, second);
    const __m512i odd = _mm512_permutex2var_epi8(first, odd_of, second);
    _mm512_storeu_si512(a->even + w * 64, even);
    _mm512_storeu_si512(a->odd + w * 64, odd);
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, even), ones, odd);
    _mm512_storeu_si512(a->minus8 + w * 16, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-8)));
  }
}

#define HIGH_HALF_DOWN 0x1020408000000000ll /* GF2P8AFFINE matrix: output bit i <- input bit i + 4 (i < 4) */

AVX512 static __m512i lane_over(int64_t divisor) { /* (0, 1, ..., 15) / divisor, lane by lane */
  int32_t lanes[16];
  for (int i = 0; i < 16; ++i) lanes[i] = (int32_t)(i / divisor);
  return _mm512_loadu_si512(lanes);
}

AVX512 static __m512i int4_window(const uint8_t *row, const Int4Activations *a, int64_t w, int64_t bytes_left) {
  const __m512i low4 = _mm512_set1_epi8(0x0f), high_down = _mm512_set1_epi64(HIGH_HALF_DOWN);
  _mm_prefetch((const char *)(row + w * 64 + INT4_PREFETCH_BYTES), _MM_HINT_T1);
  __m512i v = bytes_left >= 64 ? _mm512_loadu_si512(row + w * 64)
              : bytes_left > 0 ? _mm512_maskz_loadu_epi8(((__mmask64)1 << bytes_left) - 1, row + w * 64)
                               : _mm512_setzero_si512();
  __m512i low = _mm512_and_si512(v, low4), high = _mm512_gf2p8affine_epi64_epi8(v, high_down, 0);
  __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(a->minus8 + w * 16), high, _mm512_loadu_si512(a->even + w * 64));
  return _mm512_dpbusd_epi32(dot, low, _mm512_loadu_si512(a->odd + w * 64));
}

AVX512 static __m512i add_lane_pairs(__m512i a, __m512i b) { /* (a0+a1, a2+a3, ..., a14+a15, b0+b1, ..., b14+b15) */
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
}

/* Rows first..last of W: packed (N, K/2) plain layout; scales_and_zeros as (N, K/group, 2) bf16 pairs, a row's
   groups side by side (quantize.py keeps them so for this kernel). A row goes a span of 4 windows (16 blocks of
   32 inputs) at a time: each window's 16 int32 lanes (4 per block) are added down to one lane per block, so that
   the scales, zeros and activation sums of 16 blocks are applied with one 512-bit multiply-add each. The int32
   sums are exact. Against doing the scale work on 128-bit vectors window by window, this took the product in the
   cache from 24 to 33 GB/s per core (groups of 32; 64: 22 to 32, 128: 20 to 28); streaming from memory at ~32
   GB/s both read alike. (Two rows at a time, sharing the activation reads, was faster in the cache but slower
   streaming from memory: 20.7 against 24 GB/s, 8192x2048, 2 threads, alternating.) */
AVX512 static void int4_rows(const uint8_t *packed, const uint16_t *scales_and_zeros, const Int4Activations *a,
                             uint16_t *y, int64_t first, int64_t last, int64_t K, int64_t group) {
  const int64_t groups = K / group, blocks_per_group = group / BLOCK, spans = (a->windows + 3) / 4;
  const int64_t span_groups = 16 / blocks_per_group; /* groups in a span of 16 blocks */
  const __m512i block_group = lane_over(blocks_per_group); /* span block i -> its group in the span */
  const __m512i zero_half = _mm512_set1_epi32((int)0xffff0000u);
  for (int64_t r = first; r < last; ++r) {
    const uint8_t *row = packed + r * (K / 2);
    const int32_t *pairs = (const int32_t *)(scales_and_zeros + r * groups * 2); /* scale low half, zero high */
    __m512 acc = _mm512_setzero_ps(), zero_acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < spans; ++s) {
      const int64_t w = 4 * s, bytes_left = K / 2 - w * 64;
      const __m512i d01 = add_lane_pairs(int4_window(row, a, w, bytes_left), int4_window(row, a, w + 1, bytes_left - 64));
      const __m512i d23 = add_lane_pairs(int4_window(row, a, w + 2, bytes_left - 128),
                                         int4_window(row, a, w + 3, bytes_left - 192));
      const __m512i block_dots = add_lane_pairs(d01, d23); /* lane i: block i of the span, sum (q - 8) xq */
      const int64_t groups_left = groups - s * span_groups;
      const int64_t here = groups_left < 0 ? 0 : groups_left < span_groups ? groups_left : span_groups;
      const __mmask16 present = (__mmask16)((1u << here) - 1);
      const __m512i words = _mm512_permutexvar_epi32(block_group, _mm512_maskz_loadu_epi32(present, pairs + s * span_groups));
      const __m512 scales = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(words, 16)),
                                          _mm512_loadu_ps(a->block_scale + s * 16));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_dots), scales, acc);
      zero_acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(words, zero_half)),
                                 _mm512_loadu_ps(a->block_sum + s * 16), zero_acc);
    }
    y[r] = float_to_bf16(_mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(zero_acc));
  }
}

/* ---- int4 weights back to bf16, for prompts (many rows: there the multiply's arithmetic sets the time) ---- */

/* Rows row0 + first..last of W (scales and zeros as for int4_rows) -> out rows first..last (of K inputs), bf16:
   w = q * scale + (zero - 8 * scale) in float32 (a multiply, then an add, each rounded, as
   quantize.dequantize_int4 computes it), rounded once to bf16. */
AVX512 static void int4_dequantize_rows(const uint8_t *packed, const uint16_t *scales_and_zeros, uint16_t *out,
                                        int64_t first, int64_t last, int64_t row0, int64_t K, int64_t group) {
  uint8_t order[64]; /* natural column m <- unpacked byte: even m from the high halves (0..31), odd from the low */
  for (int m = 0; m < 64; ++m) order[m] = (uint8_t)(m % 2 ? 32 + m / 2 : m / 2);
  const __m512i natural_order = _mm512_loadu_si512(order), low4 = _mm512_set1_epi8(0x0f);
  for (int64_t r = first; r < last; ++r) {
    const uint8_t *row = packed + (row0 + r) * (K / 2);
    uint16_t *dst = out + r * K;
    for (int64_t c = 0; c < K / 64; ++c) {
      __m256i bytes = _mm256_loadu_si256((const __m256i *)(row + c * 32));
      __m512i q = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(bytes, 4)), bytes, 1), low4);
      q = _mm512_permutexvar_epi8(natural_order, q);
      __m512 w[4];
      for (int t = 0; t < 4; ++t) { /* 16 columns at a time, all in one group (groups are 32 or more) */
        const int64_t g = (c * 64 + t * 16) / group;
        const uint16_t *pair = scales_and_zeros + ((row0 + r) * (K / group) + g) * 2;
        const float scale = bf16_to_float(pair[0]), offset = bf16_to_float(pair[1]) - 8.0f * scale;
        __m512 values = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, t)));
        w[t] = _mm512_add_ps(_mm512_mul_ps(values, _mm512_set1_ps(scale)), _mm512_set1_ps(offset));
      }
      _mm512_storeu_si512(dst + c * 64, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
      _mm512_storeu_si512(dst + c * 64 + 32, (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]));
    }
  }
}

/* ---- the rest of a decode step: RMSNorm, RoPE, attention over the cache ---------------------------------- */
/* Between its products a decode step does little arithmetic, but in PyTorch that little is some forty operator
   calls a layer (casts, views, a softmax), each paying its dispatch: about 4 ms of a 1B token. These do the same
   arithmetic as model.py, rounding to bf16 where it rounds, in one call each. */

AVX512 static __m512 round_bf16(__m512 v) { /* float32 -> nearest bf16 (ties to even) -> float32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* model.rms_norm on `rows` rows of n (a multiple of 16): out = bf16(bf16(x r) w), r = 1 / sqrt(mean(x^2) + eps)
   in float32. Only the order of the float32 sum of squares differs from PyTorch's. */
AVX512 static void rms_norm_rows(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t n,
                                 float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t *row = x + r * n;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
      __m512 v = load16_bf16(row + k);
      squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t k = 0; k < n; k += 16) {
      __m512 normed = round_bf16(_mm512_mul_ps(load16_bf16(row + k), inverse));
      _mm256_storeu_si256((__m256i *)(out + r * n + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(normed, load16_bf16(w + k))));
    }
  }
}

/* model.apply_rope for one position of `rows` batch rows: each pair (a, b) = (x[2j], x[2j+1]) of each head times
   rotation j, (c, s) as complex numbers: (ac - bs, as + bc) in float32, each rounded once to bf16 -- PyTorch's
   complex product term by term. Row r's rotations start at rotations + r * rotation_stride floats. */
static void rope_rows(const uint16_t *x, const float *rotations, uint16_t *out, int64_t rows, int64_t heads,
                      int64_t head_dim, int64_t rotation_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *rotation = rotations + r * rotation_stride;
    for (int64_t i = r * heads * head_dim; i < (r + 1) * heads * head_dim; i += 2) {
      const float a = bf16_to_float(x[i]), b = bf16_to_float(x[i + 1]);
      const float c = rotation[i % head_dim], s = rotation[i % head_dim + 1];
      out[i] = float_to_bf16(a * c - b * s);
      out[i + 1] = float_to_bf16(a * s + b * c);
    }
  }
}

/* model.attend for one new position: query head h against the T cached keys and values of its group's kv head
   (h / n_rep), each a row of head_dim (a multiple of 16) every `position_stride` elements. The roundings are
   model.py's: scores to bf16, then divided by sqrt(head_dim) and rounded again, plus the mask's bf16 row
   (or none), softmax in float32, probabilities to bf16, their mix of the values summed in float32, rounded
   to bf16. `scores` holds T floats for this head. */
typedef struct {
  const uint16_t *q, *keys, *values, *mask; /* q: the head's row; keys, values: the kv head's position 0 */
  int64_t T, head_dim, position_stride;
  float divisor; /* sqrt(head_dim) as PyTorch rounds the Python float */
} HeadAttention;

AVX512 static void attend_head(const HeadAttention *a, float *scores, uint16_t *out) {
  const int64_t vectors = a->head_dim / 16;
  __m512 q[16]; /* head_dim <= 256 */
  for (int64_t j = 0; j < vectors; ++j) q[j] = load16_bf16(a->q + 16 * j);
  float largest = -INFINITY;
  for (int64_t t = 0; t < a->T; ++t) {
    const uint16_t *key = a->keys + t * a->position_stride;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < vectors; ++j) dot = _mm512_fmadd_ps(q[j], load16_bf16(key + 16 * j), dot);
    float score = bf16_to_float(float_to_bf16(bf16_to_float(float_to_bf16(_mm512_reduce_add_ps(dot))) / a->divisor));
    if (a->mask) score = bf16_to_float(float_to_bf16(score + bf16_to_float(a->mask[t])));
    scores[t] = score;
    largest = score > largest ? score : largest;
  }
  float total = 0;
  for (int64_t t = 0; t < a->T; ++t) total += scores[t] = expf(scores[t] - largest);
  const float inverse = 1.0f / total;
  __m512 mixed[16];
  for (int64_t j = 0; j < vectors; ++j) mixed[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < a->T; ++t) {
    const __m512 p = _mm512_set1_ps(bf16_to_float(float_to_bf16(scores[t] * inverse)));
    const uint16_t *value = a->values + t * a->position_stride;
    for (int64_t j = 0; j < vectors; ++j) mixed[j] = _mm512_fmadd_ps(p, load16_bf16(value + 16 * j), mixed[j]);
  }
  for (int64_t j = 0; j < vectors; ++j)
    _mm256_storeu_si256((__m256i *)(out + 16 * j), (__m256i)_mm512_cvtneps_pbh(mixed[j]));
}

/* ---- Python ------------------------------------------------------------------------------------------- */

static int supported_cpu(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni");
}

int omp_get_num_threads(void);
int omp_get_thread_num(void);

/* This thread's contiguous share [*first, *last) of N rows. */
static void my_rows(int64_t N, int64_t *first, int64_t *last) {
  const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
  *first = N * me / count;
  *last = N * (me + 1) / count;
}

static PyObject *py_supported(PyObject *self, PyObject *args) {
  (void)self, (void)args;
  return PyBool_FromLong(supported_cpu());
}

/* Several matrices multiplied by the same activations (q, k and v; w1 and w3): their rows are shared among the
   threads as one list, so that a small matrix (k, v: 512 rows) does not pay a start and an uneven end alone.
   Python passes, per matrix, the addresses of its weights, its scales (int8, int4; else 0) and its output, its
   row count and its group size (int4; else 0). */
#define MAX_MATRICES 8
typedef struct {
  unsigned long long weights, scales, y;
  long long rows, group;
} Matrix;

/* The arguments of every product: x (K bf16 activations), the list of matrices, K, threads. */
typedef struct {
  unsigned long long x;
  long long K;
  int threads;
  Matrix m[MAX_MATRICES];
  int64_t count, total_rows;
} Products;

static int parse_products(PyObject *args, Products *p) {
  PyObject *list;
  if (!PyArg_ParseTuple(args, "KOLi", &p->x, &list, &p->K, &p->threads)) return 0;
  PyObject *items = PySequence_Fast(list, "a list of matrices");
  if (!items) return 0;
  p->count = PySequence_Fast_GET_SIZE(items);
  p->total_rows = 0;
  int ok = p->count > 0 && p->count <= MAX_MATRICES;
  if (!ok) PyErr_SetString(PyExc_ValueError, "1 to 8 matrices");
  for (int64_t i = 0; ok && i < p->count; ++i) {
    Matrix *m = &p->m[i];
    ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "KKKLL", &m->weights, &m->scales, &m->y, &m->rows, &m->group);
    p->total_rows += ok ? m->rows : 0;
  }
  Py_DECREF(items);
  return ok;
}

/* This thread's share of all the matrices' rows, as [first, last) within matrix i; false where it has none there. */
static int my_part(const Products *p, int64_t i, int64_t *first, int64_t *last) {
  int64_t mine_first, mine_last, offset = 0;
  my_rows(p->total_rows, &mine_first, &mine_last);
  for (int64_t j = 0; j < i; ++j) offset += p->m[j].rows;
  *first = (mine_first > offset ? mine_first : offset) - offset;
  *last = (mine_last < offset + p->m[i].rows ? mine_last : offset + p->m[i].rows) - offset;
  return *first < *last;
}

static PyObject *py_bf16(PyObject *self, PyObject *args) {
  Products p;
  (void)self;
  if (!parse_products(args, &p)) return NULL;
  const int64_t K = p.K;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(p.threads)
  for (int64_t i = 0, first, last; i < p.count; ++i)
    if (my_part(&p, i, &first, &last))
      bf16_rows((const uint16_t *)p.m[i].weights, (const uint16_t *)p.x, (uint16_t *)p.m[i].y, first, last, K);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *py_int8(PyObject *self, PyObject *args) {
  Products p;
  (void)self;
  if (!parse_products(args, &p)) return NULL;
  const int64_t K = p.K;
  int16_t *xq = malloc(K * sizeof(int16_t));
  float *xscales = malloc(K / BLOCK * sizeof(float));
  if (!xq || !xscales) { free(xq); free(xscales); return PyErr_NoMemory(); }
  Py_BEGIN_ALLOW_THREADS
  quantize_int16((const uint16_t *)p.x, K, xq, xscales);
#pragma omp parallel num_threads(p.threads)
  for (int64_t i = 0, first, last; i < p.count; ++i)
    if (my_part(&p, i, &first, &last))
      int8_rows((const int8_t *)p.m[i].weights, (const uint16_t *)p.m[i].scales, xq, xscales, (uint16_t *)p.m[i].y,
                first, last, K);
  Py_END_ALLOW_THREADS
  free(xq);
  free(xscales);
  Py_RETURN_NONE;
}

static PyObject *py_int4(PyObject *self, PyObject *args) {
  Products p;
  (void)self;
  if (!parse_products(args, &p)) return NULL;
  const int64_t K = p.K;
  Int4Activations a;
  a.windows = (K + 127) / 128;
  const int64_t padded = (a.windows + 3) / 4 * 4; /* whole spans of 4 windows; the rest stays zero */
  a.even = calloc(padded, 64);
  a.odd = calloc(padded, 64);
  a.minus8 = calloc(padded * 16, sizeof(int32_t));
  a.block_scale = calloc(padded * 4, sizeof(float));
  a.block_sum = calloc(padded * 4, sizeof(float));
  if (a.even && a.odd && a.minus8 && a.block_scale && a.block_sum) {
    Py_BEGIN_ALLOW_THREADS
    prepare_int4_activations((const uint16_t *)p.x, K, &a);
#pragma omp parallel num_threads(p.threads)
    for (int64_t i = 0, first, last; i < p.count; ++i)
      if (my_part(&p, i, &first, &last))
        int4_rows((const uint8_t *)p.m[i].weights, (const uint16_t *)p.m[i].scales, &a, (uint16_t *)p.m[i].y, first,
                  last, K, p.m[i].group);
    Py_END_ALLOW_THREADS
  }
  int failed = !(a.even && a.odd && a.minus8 && a.block_scale && a.block_sum);
  free(a.even); free(a.odd); free(a.minus8); free(a.block_scale); free(a.block_sum);
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject *py_int4_dequantize(PyObject *self, PyObject *args) {
  unsigned long long packed, scales_and_zeros, out;
  long long row0, rows, K, group;
  int threads;
  (void)self;
  if (!PyArg_ParseTuple(args, "KKKLLLLi", &packed, &scales_and_zeros, &out, &row0, &rows, &K, &group, &threads))
    return NULL;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
  {
    int64_t first, last;
    my_rows(rows, &first, &last);
    int4_dequantize_rows((const uint8_t *)packed, (const uint16_t *)scales_and_zeros, (uint16_t *)out, first, last,
                         row0, K, group);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
  unsigned long long x, w, out;
  long long rows, n;
  float eps;
  (void)self;
  if (!PyArg_ParseTuple(args, "KKKLLf", &x, &w, &out, &rows, &n, &eps)) return NULL;
  rms_norm_rows((const uint16_t *)x, (const uint16_t *)w, (uint16_t *)out, rows, n, eps);
  Py_RETURN_NONE;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
  unsigned long long x, rotations, out;
  long long rows, heads, head_dim, rotation_stride;
  (void)self;
  if (!PyArg_ParseTuple(args, "KKKLLLL", &x, &rotations, &out, &rows, &heads, &head_dim, &rotation_stride)) return NULL;
  rope_rows((const uint16_t *)x, (const float *)rotations, (uint16_t *)out, rows, heads, head_dim, rotation_stride);
  Py_RETURN_NONE;
}

/* Heads times positions times head_dim from which the heads are shared among threads (below: one thread) */
#define ATTENTION_PARALLEL_WORK 65536

static PyObject *py_attend(PyObject *self, PyObject *args) {
  unsigned long long q, keys, values, mask, out;
  long long batch, heads, kv_heads, T, head_dim, batch_stride, position_stride, mask_stride;
  double divisor;
  int threads;
  (void)self;
  if (!PyArg_ParseTuple(args, "KKKKKLLLLLLLLdi", &q, &keys, &values, &mask, &out, &batch, &heads, &kv_heads, &T,
                        &head_dim, &batch_stride, &position_stride, &mask_stride, &divisor, &threads))
    return NULL;
  float *scores = malloc((size_t)(batch * heads * T) * sizeof(float));
  if (!scores) return PyErr_NoMemory();
  Py_BEGIN_ALLOW_THREADS
  const int64_t n_rep = heads / kv_heads;
#pragma omp parallel for num_threads(threads) if (heads * T * head_dim >= ATTENTION_PARALLEL_WORK)
  for (int64_t i = 0; i < batch * heads; ++i) {
    const int64_t b = i / heads, kv_offset = b * batch_stride + (i % heads) / n_rep * head_dim;
    const HeadAttention a = {(const uint16_t *)q + i * head_dim, (const uint16_t *)keys + kv_offset,
                             (const uint16_t *)values + kv_offset, mask ? (const uint16_t *)mask + b * mask_stride : NULL,
                             T, head_dim, position_stride, (float)divisor};
    attend_head(&a, scores + i * T, (uint16_t *)out + i * head_dim);
  }
  Py_END_ALLOW_THREADS
  free(scores);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"supported", py_supported, METH_NOARGS, "Whether this CPU has AVX-512 with BF16, VNNI, VBMI and GFNI."},
    {"bf16", py_bf16, METH_VARARGS,
     "bf16(x, [(w, 0, y, N, 0), ...], K, threads): each y (N) = w (N, K) @ x (K), all bf16 addresses."},
    {"int8", py_int8, METH_VARARGS, "int8(x, [(w, scales, y, N, 0), ...], K, threads): y = (w int8 @ x) * scales."},
    {"int4", py_int4, METH_VARARGS,
     "int4(x, [(packed, scales_and_zeros, y, N, group), ...], K, threads): y = dequantized w @ x, bf16."},
    {"int4_dequantize", py_int4_dequantize, METH_VARARGS,
     "int4_dequantize(packed, scales_and_zeros, out, row0, rows, K, group, threads): rows row0.. as bf16."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x, w, out, rows, n, eps): model.rms_norm of bf16 rows."},
    {"rope", py_rope, METH_VARARGS,
     "rope(x, rotations, out, rows, heads, head_dim, rotation_stride): model.apply_rope for one position, bf16."},
    {"attend", py_attend, METH_VARARGS,
     "attend(q, keys, values, mask, out, batch, heads, kv_heads, T, head_dim, batch_stride, position_stride, "
     "mask_stride, divisor, threads): model.attend for one new position, bf16."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode_kernels",
                                    "One-row products for decoding on AVX-512 CPUs (see the source).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__decode_kernels(void) {
  __builtin_cpu_init();
  stream_prefetch_bytes = __builtin_cpu_is("intel") ? 4096 : 0;
  return PyModule_Create(&module);
}
