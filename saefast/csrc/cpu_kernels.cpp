// CPU kernels of the torch backend's hot loops (built on first use by saefast.cpu_kernels).
//
// Notation: B rows, d_in input width, d_sae latents. Threads: at::parallel_for (torch's OpenMP
// pool, sized by torch.set_num_threads). Values are compared and accumulated in acc_t: double for
// double inputs, float otherwise (float holds every bf16 / fp16 value exactly, so comparisons
// order values as the input dtype does).
//
// * encode_select: pre = xc @ W_enc (+ b_enc) one block of latent columns at a time (the GEMM is
//   ATen's), and while a block is in cache, the selections read it: the main codes (BatchTopK: the
//   B*k largest positive entries of the whole batch; TopK: the k largest positive entries of each
//   row) and the aux codes (each row's k_aux largest positive entries among the dead latents; with
//   aux_exclude_fired, among the dead latents that the main codes leave inactive in every row).
//   With b_enc in fp32/fp64, pre = round(xc @ W_enc) + b_enc rounded (added as the block is read).
//   Ties go to the lower (row, latent) index, the rule of saefast.selection. Outputs are sorted by
//   (row, latent), CSR offsets included. The [B, d_sae] matrix is never held whole. The aux
//   selection reads a block row's dead entries right after the main selection has read the row
//   (a gather by the block's dead columns, 16 at a time, only entries above the row's bar kept);
//   a row's bar rises to its k_aux-th best so far by a bisection over float bit patterns.
// * decode_forward: out[r] = sum over row r's entries j of values[j] * W_dec[lat_j], each thread's
//   span of rows walked latent by latent (one read of a W_dec row per span, not per entry).
// * decode_backward: grad_values[j] = grad_out[row_j] . W_dec[lat_j] and
//   grad_W_dec[l] = sum over entries j of latent l of values[j] * grad_out[row_j], one pass over
//   the entries grouped by latent, each W_dec row and gradient row written once.
// * encode_backward_weight: grad_W_enc[:, l] = sum over entries j of latent l of g[j] * xc[row_j]
//   (written straight into the [d_in, d_sae] layout) and lat_sum[l] = sum of g[j].
// * decoder_norm_: per row of W_dec [d_sae, d_in], in place and in one pass over the row:
//   project (grad -= (grad . W) / max(|W|, eps)^2 * W) and/or normalise (W /= max(|W|, eps)),
//   the projection using the row before normalisation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

constexpr int64_t kScanGroup = 32;

// Bit i of the result is set where vals[i] (i < m <= kScanGroup) can enter a selection whose bar
// is `bar`: vals[i] >= bar when bar > 0, vals[i] > 0 otherwise (only positive entries are kept).
// The exact test (ties by index) is made on the entries whose bit is set, so a scan touches only
// the few entries above the bar instead of every entry of a group that has one.
template <typename A> inline uint32_t pass_mask(const A* vals, int64_t m, A bar) {
  uint32_t mask = 0;
  if (bar > A(0)) {
    for (int64_t i = 0; i < m; ++i) mask |= uint32_t(vals[i] >= bar) << i;
  } else {
    for (int64_t i = 0; i < m; ++i) mask |= uint32_t(vals[i] > A(0)) << i;
  }
  return mask;
}
#if defined(__AVX512F__)
template <> inline uint32_t pass_mask<float>(const float* vals, int64_t m, float bar) {
  if (m != kScanGroup) {
    uint32_t mask = 0;
    if (bar > 0.f) {
      for (int64_t i = 0; i < m; ++i) mask |= uint32_t(vals[i] >= bar) << i;
    } else {
      for (int64_t i = 0; i < m; ++i) mask |= uint32_t(vals[i] > 0.f) << i;
    }
    return mask;
  }
  const __m512 lo = _mm512_loadu_ps(vals), hi = _mm512_loadu_ps(vals + 16);
  const __m512 b = _mm512_set1_ps(bar);
  if (bar > 0.f) {
    return uint32_t(_mm512_cmp_ps_mask(lo, b, _CMP_GE_OQ)) | (uint32_t(_mm512_cmp_ps_mask(hi, b, _CMP_GE_OQ)) << 16);
  }
  return uint32_t(_mm512_cmp_ps_mask(lo, b, _CMP_GT_OQ)) | (uint32_t(_mm512_cmp_ps_mask(hi, b, _CMP_GT_OQ)) << 16);
}
#endif

// The k-th largest of vals[0:n] (1 <= k <= n); vals may be reordered.
template <typename A> inline A kth_largest(A* vals, int64_t n, int64_t k) {
  std::nth_element(vals, vals + (k - 1), vals + n, std::greater<A>());
  return vals[k - 1];
}
// Non-negative floats (+0 and up, no NaN) order as their bit patterns do, so the k-th largest is
// the largest pattern t with #{vals >= t} >= k: a bisection over patterns whose counts are
// branch-free vector passes, where nth_element's comparisons mispredict on random data. vals is
// left as it is.
inline float kth_largest_nonneg(const float* vals, int64_t n, int64_t k) {
  typedef uint32_t __attribute__((may_alias)) u32_alias;
  const u32_alias* bits = reinterpret_cast<const u32_alias*>(vals);
  uint64_t lo = bits[0];
  uint32_t top = bits[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min<uint64_t>(lo, bits[i]);
    top = std::max(top, bits[i]);
  }
  uint64_t hi = uint64_t(top) + 1;  // #{>= lo} = n >= k; #{>= hi} = 0 < k
  while (hi - lo > 1) {
    const uint32_t mid = uint32_t(lo + (hi - lo) / 2);
    int32_t c = 0;  // n < 2^31: a buffer of one row
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; ++i) c += bits[i] >= mid;
    if (c >= k) lo = mid; else hi = mid;
  }
  float t;
  const uint32_t t_bits = uint32_t(lo);
  std::memcpy(&t, &t_bits, sizeof t);
  return t;
}
template <> inline float kth_largest<float>(float* vals, int64_t n, int64_t k) {
  typedef uint32_t __attribute__((may_alias)) u32_alias;
  const u32_alias* bits = reinterpret_cast<const u32_alias*>(vals);
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, bits[i]);
  if (top > 0x7f800000u) {  // a negative value (-0 included) or a NaN: compare values
    std::nth_element(vals, vals + (k - 1), vals + n, std::greater<float>());
    return vals[k - 1];
  }
  return kth_largest_nonneg(vals, n, k);
}

// An entry of one row (a row selection's bar): value and latent.
template <typename A> struct Entry {
  A v;
  int32_t lat;
};

// A kept entry of a whole batch: value and flat index row * d_sae + latent.
template <typename A> struct FlatEntry {
  A v;
  int64_t flat;
};
struct FlatBefore {
  template <typename E> inline bool operator()(const E& a, const E& b) const {
    return a.v > b.v || (a.v == b.v && a.flat < b.flat);
  }
};
template <typename A> inline bool flat_before(const FlatEntry<A>& a, const FlatEntry<A>& b) { return FlatBefore()(a, b); }

// Per-row "k best so far", in increasing latent order (the order rows are scanned in): entries
// that beat the k-th best known are appended; once the buffer holds `cap` entries (2k, at least
// 64) it is cut back to the k best by a stable filter, which keeps the latent order (no sort at
// the end) and raises the bar. The bar starts at value 0 (only positive entries pass) and never
// goes below. `truncated`: a cut dropped some positive entry (else the buffer holds them all).
// Values and latents are kept apart (v[i], lat[i]), so that a group's passing entries are
// appended with two compress-stores. Every entry offered comes after the bar's latent, so it beats
// the bar exactly when its value is above the bar's (ties go to the lower latent, already in).
template <typename A> struct RowTop {
  std::vector<A> v;
  std::vector<int32_t> lat;
  int64_t n = 0;
  int64_t k = 0;
  int64_t cap = 0;
  bool truncated = false;
  Entry<A> bar{A(0), std::numeric_limits<int32_t>::max()};

  void init(int64_t k_) {
    k = k_;
    cap = std::max<int64_t>(2 * k, 64);
    v.resize(cap + kScanGroup);
    lat.resize(cap + kScanGroup);
  }
  // Offer m <= kScanGroup entries in increasing latent order: vals[i] of latent lat_of(i).
  template <typename LatOf> inline void offer(const A* vals, int64_t m, LatOf lat_of) {
    uint32_t mask = pass_mask<A>(vals, m, bar.v);
    while (mask) {
      const int i = __builtin_ctz(mask);
      mask &= mask - 1;
      v[n] = vals[i];
      lat[n] = lat_of(i);
      n += vals[i] > bar.v;  // pass_mask lets ties with the bar through; they come later: they lose
    }
    if (n >= cap) cut();
  }
  // The same for the latents lat0, lat0 + 1, ..., lat0 + m - 1, all of them.
  inline void offer_run(const A* vals, int64_t m, int32_t lat0) {
    offer(vals, m, [lat0](int i) { return lat0 + i; });
  }
  // Keep the k best (larger value, then lower latent), in order; the bar becomes the k-th best.
  void cut() {
    if (n <= k) return;
    truncated = true;
    if (k == 0) {
      n = 0;
      return;
    }
    const A t = kth_of_buffer();
    int64_t ties = k;
    for (int64_t i = 0; i < n; ++i) ties -= v[i] > t;
    n = keep_above(t, ties);
  }
  void finish() { cut(); }
  // Drop the entries of latents where skip[lat] is set (order kept).
  void drop(const std::vector<uint8_t>& skip) {
    int64_t w = 0;
    for (int64_t i = 0; i < n; ++i) {
      v[w] = v[i];
      lat[w] = lat[i];
      w += !skip[lat[i]];
    }
    n = w;
  }

 private:
  std::vector<A> scratch;
  A kth_of_buffer() {
    scratch.assign(v.begin(), v.begin() + n);
    return kth_largest(scratch.data(), n, k);
  }
  // Compact in place to the entries above t and the first `ties` entries equal to t; the bar
  // becomes (t, the last tie kept). Returns the new count.
  int64_t keep_above(A t, int64_t ties) {
    int32_t last_tie = 0;
    const int64_t w = keep_from(0, 0, t, ties, last_tie);
    bar = {t, last_tie};
    return w;
  }
  // keep_above's filter over entries [i, n), w of the earlier ones kept and `ties` ties still to
  // keep; returns the count kept.
  int64_t keep_from(int64_t i, int64_t w, A t, int64_t ties, int32_t& last_tie) {
    for (; i < n; ++i) {
      // Branch-free (bitwise, not short-circuit): on random data each test is a coin flip.
      const A e = v[i];
      const int32_t l = lat[i];
      const int tie = int(e == t) & int(ties > 0);
      ties -= tie;
      last_tie = tie ? l : last_tie;
      v[w] = e;
      lat[w] = l;
      w += int(e > t) | tie;
    }
    return w;
  }
};
#if defined(__AVX512F__)
// float: a group's entries above the bar, appended with compress-stores (no branch per entry);
// the cut's threshold read in place (the bisection does not reorder) and its filter 16 at a time.
template <> inline void RowTop<float>::offer_run(const float* vals, int64_t m, int32_t lat0) {
  if (m != kScanGroup) {
    offer(vals, m, [lat0](int i) { return lat0 + i; });
    return;
  }
  const __m512 b = _mm512_set1_ps(bar.v);
  const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(lat0),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  float* vb = v.data();  // locals: see offer_dead<float>
  int32_t* lb = lat.data();
  int64_t count = n;
  for (int h = 0; h < 2; ++h) {
    const __m512 x = _mm512_loadu_ps(vals + 16 * h);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, b, _CMP_GT_OQ);
    // Register compress + full store (the buffer has kScanGroup spare slots): the memory form
    // of the compress is slow on some cores.
    _mm512_storeu_ps(vb + count, _mm512_maskz_compress_ps(keep, x));
    const __m512i lats = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * h));
    _mm512_storeu_si512(lb + count, _mm512_maskz_compress_epi32(keep, lats));
    count += __builtin_popcount(keep);
  }
  n = count;
  if (n >= cap) cut();
}
template <> inline float RowTop<float>::kth_of_buffer() {
  return kth_largest_nonneg(v.data(), n, k);  // every kept value is above 0
}
template <> inline int64_t RowTop<float>::keep_above(float t, int64_t ties) {
  const __m512 tv = _mm512_set1_ps(t);
  int64_t w = 0;
  int32_t last_tie = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v.data() + i);
    const __m512i l = _mm512_loadu_si512(lat.data() + i);
    __mmask16 keep = _mm512_cmp_ps_mask(x, tv, _CMP_GT_OQ);
    __mmask16 eq = _mm512_cmp_ps_mask(x, tv, _CMP_EQ_OQ);
    while (eq && ties > 0) {  // rare: entries equal to the threshold, first ones first
      const int j = __builtin_ctz(eq);
      eq &= eq - 1;
      keep |= __mmask16(1u << j);
      last_tie = lat[i + j];
      --ties;
    }
    // In place: the store covers [w, w + 16) with w <= i, entries already loaded.
    _mm512_storeu_ps(v.data() + w, _mm512_maskz_compress_ps(keep, x));
    _mm512_storeu_si512(lat.data() + w, _mm512_maskz_compress_epi32(keep, l));
    w += __builtin_popcount(keep);
  }
  w = keep_from(i, w, t, ties, last_tie);
  bar = {t, last_tie};
  return w;
}
#endif

// Per-slab "n best so far" over a group of rows (BatchTopK candidates): the n-th best of a subset
// of the batch is at most the n-th best of the whole batch, so entries below it can be dropped.
template <typename A> struct BatchTop {
  std::vector<FlatEntry<A>> buf;
  int64_t size = 0;
  FlatEntry<A> bar{A(0), std::numeric_limits<int64_t>::max()};
  int64_t n = 0;

  inline bool beats(A v, int64_t flat) const { return v > bar.v || (v == bar.v && bar.v > A(0) && flat < bar.flat); }
  // Offer m <= kScanGroup entries vals[i] at flat index flat0 + i.
  inline void offer(const A* vals, int64_t m, int64_t flat0) {
    uint32_t mask = pass_mask<A>(vals, m, bar.v);
    if (!mask) return;
    if ((int64_t)buf.size() < size + kScanGroup) buf.resize(std::max<int64_t>(size + kScanGroup, 2 * (int64_t)buf.size()));
    while (mask) {
      const int i = __builtin_ctz(mask);
      mask &= mask - 1;
      buf[size] = {vals[i], flat0 + i};
      size += beats(vals[i], flat0 + i);
    }
    if (size >= std::max<int64_t>(2 * n, 1024)) shrink();
  }
  void shrink() {
    std::nth_element(buf.begin(), buf.begin() + (n - 1), buf.begin() + size, FlatBefore());
    size = n;
    bar = buf[0];
    for (int64_t i = 1; i < size; ++i) if (flat_before<A>(bar, buf[i])) bar = buf[i];
  }
};

// Sorted-by-(row, latent) outputs of per-row selections: values, int32 latents, int32 rows, offsets.
template <typename T, typename A>
std::vector<at::Tensor> rows_to_csr(std::vector<RowTop<A>>& tops, const at::TensorOptions& vopt) {
  const int64_t n_rows = tops.size();
  at::Tensor offsets = at::empty({n_rows + 1}, at::kLong);
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t r = 0; r < n_rows; ++r) off[r + 1] = off[r] + tops[r].n;
  const int64_t nnz = off[n_rows];
  at::Tensor values = at::empty({nnz}, vopt);
  at::Tensor lats = at::empty({nnz}, at::kInt);
  at::Tensor rows = at::empty({nnz}, at::kInt);
  T* vp = values.data_ptr<T>();
  int32_t* lp = lats.data_ptr<int32_t>();
  int32_t* rp = rows.data_ptr<int32_t>();
  at::parallel_for(0, n_rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t o = off[r];
      for (int64_t i = 0; i < tops[r].n; ++i) {
        vp[o] = static_cast<T>(tops[r].v[i]);
        lp[o] = tops[r].lat[i];
        rp[o] = (int32_t)r;
        ++o;
      }
    }
  });
  return {values, lats, rows, offsets};
}

// Runs body(c0, width, pre, ld, value, bias) for each block of latent columns [c0, c0 + width)
// that wants(c0, c1) accepts, with pre = x @ W_enc[:, c0:c0 + width] in a reused [rows, cols]
// buffer, value(p, j) the pre-activation (b_enc included, rounded to T) of entry j of a block row
// p, and bias the block's b_enc entries that value adds (nullptr when it adds none).
template <typename T, typename Wants, typename Body>
void for_each_block(const at::Tensor& x, const at::Tensor& W_enc, const c10::optional<at::Tensor>& b_enc,
                    int64_t block_cols, Wants wants, Body body) {
  using A = typename Acc<T>::type;
  const int64_t d_sae = W_enc.size(1);
  const int64_t cols = std::max<int64_t>(1, std::min<int64_t>(block_cols, d_sae));
  at::Tensor buf = at::empty({x.size(0), cols}, x.options());
  // fp32/fp64: the bias is added as the block is read (addmm would first copy it into every
  // row of the block: a write of the whole block). 16-bit: addmm, whose fp32 accumulator takes
  // the bias before the one rounding to the dtype.
  const bool bias_on_read = b_enc.has_value() && sizeof(T) >= 4;
  for (int64_t c0 = 0; c0 < d_sae; c0 += cols) {
    const int64_t c1 = std::min<int64_t>(d_sae, c0 + cols), width = c1 - c0;
    if (!wants(c0, c1)) continue;
    at::Tensor out = buf.narrow(1, 0, width);
    if (b_enc.has_value() && !bias_on_read) {
      at::addmm_out(out, b_enc->narrow(0, c0, width), x, W_enc.narrow(1, c0, width));
    } else {
      at::mm_out(out, x, W_enc.narrow(1, c0, width));
    }
    const T* bias = bias_on_read ? b_enc->data_ptr<T>() + c0 : nullptr;
    // Entry j of a block row, rounded to the dtype as the pre-activation is.
    auto value = [bias](const T* p, int64_t j) -> A {
      return bias ? static_cast<A>(static_cast<T>(static_cast<A>(p[j]) + static_cast<A>(bias[j])))
                  : static_cast<A>(p[j]);
    };
    body(c0, width, (const T*)buf.data_ptr<T>(), cols, value, bias);
  }
}

// The dead latents of one block of columns starting at c0: lat[0:n] (increasing), their columns
// in the block col[i] = lat[i] - c0, and the b_enc entries the block's values add (or none).
template <typename T> struct BlockDead {
  const int32_t* lat = nullptr;
  int64_t n = 0;
  std::vector<int32_t> col;
  std::vector<T> bias;
  void set(const std::vector<int32_t>& dead, size_t d_lo, size_t d_hi, int64_t c0, const T* block_bias) {
    lat = dead.data() + d_lo;
    n = (int64_t)(d_hi - d_lo);
    col.resize(n);
    for (int64_t i = 0; i < n; ++i) col[i] = (int32_t)(lat[i] - c0);
    bias.resize(block_bias ? n : 0);
    for (int64_t i = 0; i < (int64_t)bias.size(); ++i) bias[i] = block_bias[col[i]];
  }
  const T* bias_or_null() const { return bias.empty() ? nullptr : bias.data(); }
};

// Offer the entries of a block row p at the block's dead latents to top (as value(p, col[i])
// reads them: b_enc added and rounded to T).
template <typename T, typename A>
inline void offer_dead(RowTop<A>& top, const T* p, const BlockDead<T>& dead) {
  const T* bias = dead.bias_or_null();
  A vals[kScanGroup];
  for (int64_t d0 = 0; d0 < dead.n; d0 += kScanGroup) {
    const int64_t m = std::min<int64_t>(kScanGroup, dead.n - d0);
    for (int64_t i = 0; i < m; ++i) {
      const A x = static_cast<A>(p[dead.col[d0 + i]]);
      vals[i] = bias ? static_cast<A>(static_cast<T>(x + static_cast<A>(bias[d0 + i]))) : x;
    }
    top.offer(vals, m, [&](int i) { return dead.lat[d0 + i]; });
  }
}
#if defined(__AVX512F__)
// float: 16 dead entries at a time by a gather (the float sum p + bias is value's rounding), and
// those above the bar appended with compress-stores.
template <>
inline void offer_dead<float, float>(RowTop<float>& top, const float* p, const BlockDead<float>& dead) {
  const float* bias = dead.bias_or_null();
  // Locals, not the members: the stores below may alias anything as far as the compiler knows,
  // which would make each count wait for the previous store.
  float* vb = top.v.data();
  int32_t* lb = top.lat.data();
  int64_t n = top.n;
  __m512 bar = _mm512_set1_ps(top.bar.v);
  for (int64_t d0 = 0; d0 < dead.n; d0 += 16) {
    const __mmask16 in = dead.n - d0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (dead.n - d0)) - 1u);
    const __m512i c = _mm512_maskz_loadu_epi32(in, dead.col.data() + d0);
    __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, c, p, 4);
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(in, bias + d0));
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(in, x, bar, _CMP_GT_OQ);
    _mm512_storeu_ps(vb + n, _mm512_maskz_compress_ps(keep, x));
    _mm512_storeu_si512(lb + n, _mm512_maskz_compress_epi32(keep, _mm512_maskz_loadu_epi32(in, dead.lat + d0)));
    n += __builtin_popcount(keep);
    if (n >= top.cap) {
      top.n = n;
      top.cut();  // compacts in place: the buffers stay where they are
      n = top.n;
      bar = _mm512_set1_ps(top.bar.v);
    }
  }
  top.n = n;
}
#endif

// Each row's k_aux best entries among `dead` (increasing latent ids) for the rows `rows` of xc,
// from a pass of their own over the blocks holding those latents.
template <typename T>
void rows_aux_pass(const at::Tensor& xc, const at::Tensor& W_enc, const c10::optional<at::Tensor>& b_enc,
                   const std::vector<int32_t>& dead, int64_t k_aux, int64_t block_cols,
                   const std::vector<int64_t>& rows, std::vector<RowTop<typename Acc<T>::type>>& tops) {
  using A = typename Acc<T>::type;
  if (rows.empty()) return;
  at::Tensor idx = at::empty({(int64_t)rows.size()}, at::kLong);
  std::copy(rows.begin(), rows.end(), idx.data_ptr<int64_t>());
  const at::Tensor x = xc.index_select(0, idx).contiguous();
  std::vector<RowTop<A>> fresh(rows.size());
  for (auto& t : fresh) t.init(std::min<int64_t>(k_aux, (int64_t)dead.size()));
  size_t dead_pos = 0;
  BlockDead<T> block_dead;
  for_each_block<T>(x, W_enc, b_enc, block_cols,
      [&](int64_t c0, int64_t c1) {
        while (dead_pos < dead.size() && dead[dead_pos] < c0) ++dead_pos;
        return dead_pos < dead.size() && dead[dead_pos] < c1;
      },
      [&](int64_t c0, int64_t width, const T* pre, int64_t ld, auto, const T* bias) {
        const size_t d_lo = dead_pos;
        size_t d_hi = d_lo;
        while (d_hi < dead.size() && dead[d_hi] < c0 + width) ++d_hi;
        block_dead.set(dead, d_lo, d_hi, c0, bias);
        at::parallel_for(0, (int64_t)rows.size(), 16, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) offer_dead<T, A>(fresh[r], pre + r * ld, block_dead);
        });
      });
  for (size_t i = 0; i < rows.size(); ++i) {
    fresh[i].finish();
    tops[rows[i]] = std::move(fresh[i]);
  }
}

template <typename T>
std::vector<at::Tensor> encode_select_impl(const at::Tensor& xc, const at::Tensor& W_enc,
                                           const c10::optional<at::Tensor>& b_enc, int64_t mode, int64_t k,
                                           const c10::optional<at::Tensor>& dead_mask, int64_t k_aux,
                                           int64_t block_cols, int64_t aux_keep, bool aux_exclude_fired) {
  using A = typename Acc<T>::type;
  const int64_t n_rows = xc.size(0), d_sae = W_enc.size(1);
  const bool want_main = mode != 0 && k > 0;
  const bool want_aux = dead_mask.has_value() && k_aux > 0;

  // Dead latents in increasing order (so each row's aux candidates come in increasing latent order).
  std::vector<int32_t> dead;
  if (want_aux) {
    const bool* dm = dead_mask->data_ptr<bool>();
    for (int64_t l = 0; l < d_sae; ++l) if (dm[l]) dead.push_back((int32_t)l);
  }
  const bool aux_on = want_aux && !dead.empty();
  const bool exclude = aux_on && aux_exclude_fired && want_main;
  const int64_t aux_k = aux_on ? std::min<int64_t>(k_aux, (int64_t)dead.size()) : 0;
  // Excluding fired latents: each row keeps more candidates, so that after the fired ones are
  // dropped at least aux_k usually remain; rows left short are recomputed (rows_aux_pass).
  const int64_t aux_first = exclude ? std::min<int64_t>(std::max(aux_keep, aux_k), (int64_t)dead.size()) : aux_k;

  // Slabs of rows for the BatchTopK candidates, one per thread: each slab's bar (its n_keep-th
  // best entry) is a lower bound of the batch's, and the answer is picked exactly from the
  // union, so the result does not depend on the slabs.
  const int64_t n_keep = (mode == 1) ? std::min<int64_t>(n_rows * k, n_rows * d_sae) : 0;
  const int64_t n_threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t slab_rows = (n_rows + n_threads - 1) / n_threads;
  const int64_t n_slabs = (n_rows + slab_rows - 1) / slab_rows;
  std::vector<BatchTop<A>> slabs(mode == 1 && want_main ? n_slabs : 0);
  for (auto& s : slabs) s.n = n_keep;
  std::vector<RowTop<A>> main_rows(mode == 2 && want_main ? n_rows : 0);
  for (auto& t : main_rows) t.init(std::min<int64_t>(k, d_sae));
  std::vector<RowTop<A>> aux_rows(aux_on ? n_rows : 0);
  for (auto& t : aux_rows) t.init(aux_first);

  size_t dead_pos = 0;
  size_t d_lo = 0, d_hi = 0;  // dead[d_lo:d_hi]: the dead latents of the current block
  BlockDead<T> block_dead;
  for_each_block<T>(xc, W_enc, b_enc, block_cols,
      [&](int64_t c0, int64_t c1) {
        d_lo = dead_pos;
        while (dead_pos < dead.size() && dead[dead_pos] < c1) ++dead_pos;
        d_hi = dead_pos;
        return want_main || d_lo < d_hi;
      },
      [&](int64_t c0, int64_t width, const T* pre, int64_t ld, auto value, const T* bias) {
        const bool aux_here = aux_on && d_hi > d_lo;
        if (aux_here) block_dead.set(dead, d_lo, d_hi, c0, bias);
        // Row r of the block, one group of kScanGroup entries at a time: the main selection's
        // offer(vals, m, j0); then, while the row is in cache, the aux offer of its dead entries.
        auto scan_row = [&](int64_t r, auto&& main_offer) {
          const T* p = pre + r * ld;
          A vals[kScanGroup];
          for (int64_t j0 = 0; j0 < width; j0 += kScanGroup) {
            const int64_t m = std::min<int64_t>(kScanGroup, width - j0);
            for (int64_t i = 0; i < m; ++i) vals[i] = value(p, j0 + i);
            main_offer(vals, m, j0);
          }
          if (aux_here) offer_dead<T, A>(aux_rows[r], p, block_dead);
        };
        if (mode == 1 && want_main) {
          at::parallel_for(0, n_slabs, 1, [&](int64_t s0, int64_t s1) {
            for (int64_t s = s0; s < s1; ++s) {
              BatchTop<A>& top = slabs[s];
              const int64_t r1 = std::min<int64_t>(n_rows, (s + 1) * slab_rows);
              for (int64_t r = s * slab_rows; r < r1; ++r) {
                const int64_t flat0 = r * d_sae + c0;
                scan_row(r, [&](const A* vals, int64_t m, int64_t j0) { top.offer(vals, m, flat0 + j0); });
              }
            }
          });
        } else if (mode == 2 && want_main) {
          at::parallel_for(0, n_rows, 16, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              RowTop<A>& top = main_rows[r];
              scan_row(r, [&](const A* vals, int64_t m, int64_t j0) {
                top.offer_run(vals, m, (int32_t)(c0 + j0));
              });
            }
          });
        } else if (aux_here) {
          at::parallel_for(0, n_rows, 16, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) offer_dead<T, A>(aux_rows[r], pre + r * ld, block_dead);
          });
        }
      });

  const auto vopt = xc.options();
  std::vector<at::Tensor> result;
  if (mode == 1 && want_main) {
    std::vector<FlatEntry<A>> all;
    size_t total = 0;
    for (auto& s : slabs) total += s.size;
    all.reserve(total);
    for (auto& s : slabs) all.insert(all.end(), s.buf.begin(), s.buf.begin() + s.size);
    if ((int64_t)all.size() > n_keep) {
      std::nth_element(all.begin(), all.begin() + (n_keep - 1), all.end(), FlatBefore());
      all.resize(n_keep);
    }
    std::sort(all.begin(), all.end(), [](const FlatEntry<A>& a, const FlatEntry<A>& b) { return a.flat < b.flat; });
    const int64_t nnz = all.size();
    at::Tensor values = at::empty({nnz}, vopt);
    at::Tensor lats = at::empty({nnz}, at::kInt);
    at::Tensor rows = at::empty({nnz}, at::kInt);
    at::Tensor offsets = at::zeros({n_rows + 1}, at::kLong);
    T* vp = values.data_ptr<T>();
    int32_t* lp = lats.data_ptr<int32_t>();
    int32_t* rp = rows.data_ptr<int32_t>();
    int64_t* off = offsets.data_ptr<int64_t>();
    for (int64_t i = 0; i < nnz; ++i) {
      vp[i] = static_cast<T>(all[i].v);
      lp[i] = (int32_t)(all[i].flat % d_sae);
      rp[i] = (int32_t)(all[i].flat / d_sae);
      off[rp[i] + 1] += 1;
    }
    for (int64_t r = 0; r < n_rows; ++r) off[r + 1] += off[r];
    result = {values, lats, rows, offsets};
  } else if (mode == 2 && want_main) {
    at::parallel_for(0, (int64_t)main_rows.size(), 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) main_rows[r].finish();
    });
    result = rows_to_csr<T, A>(main_rows, vopt);
  } else {
    result = {at::empty({0}, vopt), at::empty({0}, at::kInt), at::empty({0}, at::kInt), at::zeros({n_rows + 1}, at::kLong)};
  }
  if (aux_on) {
    at::parallel_for(0, (int64_t)aux_rows.size(), 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) aux_rows[r].finish();
    });
    if (exclude) {
      // Drop the latents the main codes use; a row keeps its aux_k best of the rest, which are
      // its aux_k best among the unfired dead latents unless its candidates ran short after a cut
      // (then the row is recomputed over those latents alone).
      std::vector<uint8_t> fired(d_sae, 0);
      const int32_t* lp = result[1].data_ptr<int32_t>();
      for (int64_t i = 0; i < result[1].numel(); ++i) fired[lp[i]] = 1;
      std::vector<int32_t> unfired;
      for (int32_t l : dead) if (!fired[l]) unfired.push_back(l);
      const int64_t k_final = std::min<int64_t>(k_aux, (int64_t)unfired.size());
      std::vector<uint8_t> short_row(n_rows, 0);
      at::parallel_for(0, n_rows, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          RowTop<A>& t = aux_rows[r];
          t.drop(fired);
          if (t.n >= k_final) {
            t.k = k_final;
            t.finish();
          } else {
            short_row[r] = t.truncated;
          }
        }
      });
      std::vector<int64_t> redo;
      for (int64_t r = 0; r < n_rows; ++r) if (short_row[r]) redo.push_back(r);
      rows_aux_pass<T>(xc, W_enc, b_enc, unfired, k_final, block_cols, redo, aux_rows);
    }
    auto aux = rows_to_csr<T, A>(aux_rows, vopt);
    result.insert(result.end(), aux.begin(), aux.end());
  } else {
    result.insert(result.end(), {at::empty({0}, vopt), at::empty({0}, at::kInt), at::empty({0}, at::kInt),
                                 at::zeros({n_rows + 1}, at::kLong)});
  }
  return result;
}

std::vector<at::Tensor> encode_select(const at::Tensor& xc, const at::Tensor& W_enc, const c10::optional<at::Tensor>& b_enc,
                                      int64_t mode, int64_t k, const c10::optional<at::Tensor>& dead_mask,
                                      int64_t k_aux, int64_t block_cols, int64_t aux_keep, bool aux_exclude_fired) {
  TORCH_CHECK(xc.dim() == 2 && W_enc.dim() == 2 && xc.size(1) == W_enc.size(0), "encode_select: shapes");
  TORCH_CHECK(xc.is_contiguous() && W_enc.stride(1) == 1, "encode_select: layouts");
  TORCH_CHECK(!b_enc.has_value() || (b_enc->is_contiguous() && b_enc->numel() == W_enc.size(1) &&
                                     b_enc->scalar_type() == xc.scalar_type()), "encode_select: b_enc");
  TORCH_CHECK(mode >= 0 && mode <= 2, "encode_select: mode");
  TORCH_CHECK(W_enc.size(1) < std::numeric_limits<int32_t>::max(), "encode_select: d_sae too large");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "encode_select", [&] {
    out = encode_select_impl<scalar_t>(xc, W_enc, b_enc, mode, k, dead_mask, k_aux, block_cols, aux_keep,
                                       aux_exclude_fired);
  });
  return out;
}

// decode_forward: out[r] = sum over the entries j of row r of values[j] * W_dec[lat_j], in the
// accumulation dtype. The rows are cut into one span per thread holding about as many entries
// each; a thread walks its span's entries latent by latent (a counting sort of the span), so a
// W_dec row is read once per span instead of once per entry, while the span's output rows stay in
// its cache. Each output row still takes its entries in increasing latent order (the order of a
// row's entries in codes), so the sum is the row-by-row sum, term for term.
template <typename T>
void decode_forward_impl(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& offsets,
                         const at::Tensor& W_dec, at::Tensor& out) {
  using A = typename Acc<T>::type;
  const int64_t n_rows = offsets.numel() - 1, d_sae = W_dec.size(0), d_in = W_dec.size(1);
  const int64_t nnz = values.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* W = W_dec.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const int32_t* lat = indices.data_ptr<int32_t>();
  A* o = out.data_ptr<A>();
  const int64_t n_spans = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_rows));
  // Span s: rows [bound[s], bound[s + 1]), cut where the entry count passes s * nnz / n_spans.
  std::vector<int64_t> bound(n_spans + 1, n_rows);
  bound[0] = 0;
  for (int64_t s = 1; s < n_spans; ++s) {
    bound[s] = std::upper_bound(off, off + n_rows + 1, s * nnz / n_spans) - off - 1;
    bound[s] = std::max(bound[s], bound[s - 1]);
  }
  at::parallel_for(0, n_spans, 1, [&](int64_t s0, int64_t s1) {
    std::vector<int32_t> starts, order, rows;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = bound[s], r1 = bound[s + 1];
      if (r0 >= r1) continue;
      std::fill(o + r0 * d_in, o + r1 * d_in, A(0));
      const int64_t e0 = off[r0], e1 = off[r1];
      rows.resize(e1 - e0);  // each entry's row, as the offsets say
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(rows.begin() + (off[r] - e0), rows.begin() + (off[r + 1] - e0), (int32_t)r);
      }
      starts.assign(d_sae + 1, 0);
      for (int64_t j = e0; j < e1; ++j) starts[lat[j] + 1] += 1;
      for (int64_t l = 0; l < d_sae; ++l) starts[l + 1] += starts[l];
      order.resize(e1 - e0);
      for (int64_t j = e0; j < e1; ++j) order[starts[lat[j]]++] = (int32_t)(j - e0);
      // starts[l] is now the end of latent l's entries in order.
      int64_t p = 0;
      for (int64_t q = 0; q < (int64_t)order.size(); q = p) {
        const int64_t l = lat[e0 + order[q]];
        const T* wl = W + l * d_in;
        for (p = q; p < starts[l]; ++p) {
          const int64_t j = e0 + order[p];
          const A a = static_cast<A>(v[j]);
          A* orow = o + (int64_t)rows[j - e0] * d_in;
#pragma omp simd
          for (int64_t i = 0; i < d_in; ++i) orow[i] += a * static_cast<A>(wl[i]);
        }
      }
    }
  });
}

// out [n_rows, d_in] in the accumulation dtype (float, or double for double inputs); row r sums the
// entries offsets[r]:offsets[r + 1].
at::Tensor decode_forward(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& offsets,
                          const at::Tensor& W_dec) {
  TORCH_CHECK(W_dec.dim() == 2 && W_dec.is_contiguous() && values.is_contiguous() && indices.is_contiguous() &&
              offsets.is_contiguous(), "decode_forward: layouts");
  TORCH_CHECK(values.scalar_type() == W_dec.scalar_type() && indices.scalar_type() == at::kInt &&
              offsets.scalar_type() == at::kLong, "decode_forward: dtypes");
  // The walk indexes W_dec by latent and counts entries per latent: out-of-range entries would
  // read and write out of bounds.
  const int64_t n_rows = offsets.numel() - 1, nnz = values.numel();
  TORCH_CHECK(n_rows >= 0 && indices.numel() == nnz, "decode_forward: sizes");
  const int64_t* off = offsets.data_ptr<int64_t>();
  bool monotone = off[0] == 0 && off[n_rows] == nnz;
  for (int64_t r = 0; r < n_rows; ++r) monotone &= off[r] <= off[r + 1];
  TORCH_CHECK(monotone, "sparse_decode: acts.offsets must rise from 0 to nnz (CSR row offsets)");
  const int32_t* lat = indices.data_ptr<int32_t>();
  int32_t lo = 0, hi = 0;
  for (int64_t j = 0; j < nnz; ++j) {
    lo = std::min(lo, lat[j]);
    hi = std::max(hi, lat[j]);
  }
  TORCH_CHECK(lo >= 0 && (nnz == 0 || hi < W_dec.size(0)), "sparse_decode: acts.indices must lie in [0, d_sae = ",
              W_dec.size(0), "), found ", lo, "..", hi);
  const auto acc = W_dec.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({n_rows, W_dec.size(1)}, W_dec.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "decode_forward", [&] {
    decode_forward_impl<scalar_t>(values, indices, offsets, W_dec, out);
  });
  return out;
}

// Entries grouped by latent (a counting sort): order[starts[l]:starts[l+1]] are latent l's entries.
void group_by_latent(const int32_t* lat, int64_t nnz, int64_t d_sae, std::vector<int64_t>& starts,
                     std::vector<int64_t>& order) {
  starts.assign(d_sae + 1, 0);
  for (int64_t j = 0; j < nnz; ++j) starts[lat[j] + 1] += 1;
  for (int64_t l = 0; l < d_sae; ++l) starts[l + 1] += starts[l];
  std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
  order.resize(nnz);
  for (int64_t j = 0; j < nnz; ++j) order[fill[lat[j]]++] = j;
}

template <typename T>
void decode_backward_impl(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
                          const at::Tensor& row_ids, const at::Tensor& W_dec, at::Tensor* grad_values,
                          at::Tensor* grad_W) {
  using A = typename Acc<T>::type;
  const int64_t nnz = values.numel(), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  std::vector<int64_t> starts, order;
  group_by_latent(indices.data_ptr<int32_t>(), nnz, d_sae, starts, order);
  const T* g = grad_out.data_ptr<T>();
  const T* W = W_dec.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const int32_t* rows = row_ids.data_ptr<int32_t>();
  T* gv = grad_values ? grad_values->data_ptr<T>() : nullptr;
  T* gW = grad_W ? grad_W->data_ptr<T>() : nullptr;
  at::parallel_for(0, d_sae, 256, [&](int64_t l0, int64_t l1) {
    // In the accumulation dtype: W_dec's row and the gradient row are read and summed in place;
    // otherwise in a widened copy of the row and a local accumulator.
    constexpr bool in_place = std::is_same<T, A>::value;
    std::vector<A> acc_buf(in_place ? 0 : d_in), w_buf(in_place ? 0 : d_in);
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t a = starts[l], b = starts[l + 1];
      A* acc = in_place && gW ? reinterpret_cast<A*>(gW + l * d_in) : acc_buf.data();
      if (gW) std::fill(acc, acc + d_in, A(0));
      if (a < b) {
        const T* wl = W + l * d_in;
        const A* w = in_place ? reinterpret_cast<const A*>(wl) : w_buf.data();
        if (!in_place) for (int64_t i = 0; i < d_in; ++i) w_buf[i] = static_cast<A>(wl[i]);
        int64_t p = a;
        // Four entries at a time: four independent dot products, and acc read and written once
        // for the four (each pass over a row is bound by loads and FMA latency, not arithmetic).
        for (; p + 4 <= b; p += 4) {
          const int64_t j0 = order[p], j1 = order[p + 1], j2 = order[p + 2], j3 = order[p + 3];
          const T* g0 = g + (int64_t)rows[j0] * d_in;
          const T* g1 = g + (int64_t)rows[j1] * d_in;
          const T* g2 = g + (int64_t)rows[j2] * d_in;
          const T* g3 = g + (int64_t)rows[j3] * d_in;
          if (gv) {
            A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t i = 0; i < d_in; ++i) {
              const A wi = w[i];
              d0 += static_cast<A>(g0[i]) * wi;
              d1 += static_cast<A>(g1[i]) * wi;
              d2 += static_cast<A>(g2[i]) * wi;
              d3 += static_cast<A>(g3[i]) * wi;
            }
            gv[j0] = static_cast<T>(d0);
            gv[j1] = static_cast<T>(d1);
            gv[j2] = static_cast<T>(d2);
            gv[j3] = static_cast<T>(d3);
          }
          if (gW) {
            const A v0 = static_cast<A>(v[j0]), v1 = static_cast<A>(v[j1]);
            const A v2 = static_cast<A>(v[j2]), v3 = static_cast<A>(v[j3]);
#pragma omp simd
            for (int64_t i = 0; i < d_in; ++i) {
              acc[i] += (v0 * static_cast<A>(g0[i]) + v1 * static_cast<A>(g1[i])) +
                        (v2 * static_cast<A>(g2[i]) + v3 * static_cast<A>(g3[i]));
            }
          }
        }
        for (; p < b; ++p) {
          const int64_t j = order[p];
          const T* gr = g + (int64_t)rows[j] * d_in;
          if (gv) {
            A dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d_in; ++i) dot += static_cast<A>(gr[i]) * w[i];
            gv[j] = static_cast<T>(dot);
          }
          if (gW) {
            const A vj = static_cast<A>(v[j]);
            for (int64_t i = 0; i < d_in; ++i) acc[i] += vj * static_cast<A>(gr[i]);
          }
        }
      }
      if (gW && !in_place) {
        T* out = gW + l * d_in;
        for (int64_t i = 0; i < d_in; ++i) out[i] = static_cast<T>(acc[i]);
      }
    }
  });
}

// grad_values [nnz] (or undefined) and grad_W_dec [d_sae, d_in] written into out_W (or undefined).
std::vector<at::Tensor> decode_backward(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
                                        const at::Tensor& row_ids, const at::Tensor& W_dec, bool need_values,
                                        const c10::optional<at::Tensor>& out_W) {
  TORCH_CHECK(grad_out.is_contiguous() && W_dec.is_contiguous() && values.is_contiguous(), "decode_backward: layouts");
  TORCH_CHECK(grad_out.scalar_type() == W_dec.scalar_type() && values.scalar_type() == W_dec.scalar_type(),
              "decode_backward: dtypes");
  at::Tensor gv = need_values ? at::empty_like(values) : at::Tensor();
  at::Tensor gW = out_W.has_value() ? *out_W : at::Tensor();
  if (gW.defined()) TORCH_CHECK(gW.is_contiguous() && gW.sizes() == W_dec.sizes(), "decode_backward: out_W");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "decode_backward", [&] {
    decode_backward_impl<scalar_t>(grad_out, values, indices, row_ids, W_dec, gv.defined() ? &gv : nullptr,
                                   gW.defined() ? &gW : nullptr);
  });
  return {gv, gW};
}

template <typename T>
void encode_backward_weight_impl(const at::Tensor& g_values, const at::Tensor& xc, const at::Tensor& indices,
                                 const at::Tensor& row_ids, int64_t d_sae, at::Tensor* grad_W, at::Tensor& lat_sum) {
  using A = typename Acc<T>::type;
  const int64_t nnz = g_values.numel(), d_in = xc.size(1);
  std::vector<int64_t> starts, order;
  group_by_latent(indices.data_ptr<int32_t>(), nnz, d_sae, starts, order);
  const A* g = g_values.data_ptr<A>();
  const T* x = xc.data_ptr<T>();
  const int32_t* rows = row_ids.data_ptr<int32_t>();
  T* gW = grad_W ? grad_W->data_ptr<T>() : nullptr;  // [d_in, d_sae]
  A* ls = lat_sum.data_ptr<A>();
  constexpr int64_t kLat = 16;  // latents per tile: 16 consecutive outputs of each W_enc row
  const int64_t n_tiles = (d_sae + kLat - 1) / kLat;
  at::parallel_for(0, n_tiles, 8, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(kLat * d_in);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t l0 = t * kLat, l1 = std::min<int64_t>(d_sae, l0 + kLat), n = l1 - l0;
      if (gW) std::fill(acc.begin(), acc.begin() + n * d_in, A(0));
      for (int64_t l = l0; l < l1; ++l) {
        A s = 0;
        A* al = acc.data() + (l - l0) * d_in;
        int64_t p = starts[l];
        // Eight, then four entries at a time: al read and written once for them.
        for (; p + 8 <= starts[l + 1]; p += 8) {
          const int64_t* o = order.data() + p;
          const A c0 = g[o[0]], c1 = g[o[1]], c2 = g[o[2]], c3 = g[o[3]];
          const A c4 = g[o[4]], c5 = g[o[5]], c6 = g[o[6]], c7 = g[o[7]];
          s += ((c0 + c1) + c2) + c3;
          s += ((c4 + c5) + c6) + c7;
          if (gW) {
            const T* x0 = x + (int64_t)rows[o[0]] * d_in;
            const T* x1 = x + (int64_t)rows[o[1]] * d_in;
            const T* x2 = x + (int64_t)rows[o[2]] * d_in;
            const T* x3 = x + (int64_t)rows[o[3]] * d_in;
            const T* x4 = x + (int64_t)rows[o[4]] * d_in;
            const T* x5 = x + (int64_t)rows[o[5]] * d_in;
            const T* x6 = x + (int64_t)rows[o[6]] * d_in;
            const T* x7 = x + (int64_t)rows[o[7]] * d_in;
#pragma omp simd
            for (int64_t i = 0; i < d_in; ++i) {
              al[i] += ((c0 * static_cast<A>(x0[i]) + c1 * static_cast<A>(x1[i])) +
                        (c2 * static_cast<A>(x2[i]) + c3 * static_cast<A>(x3[i]))) +
                       ((c4 * static_cast<A>(x4[i]) + c5 * static_cast<A>(x5[i])) +
                        (c6 * static_cast<A>(x6[i]) + c7 * static_cast<A>(x7[i])));
            }
          }
        }
        for (; p + 4 <= starts[l + 1]; p += 4) {
          const int64_t j0 = order[p], j1 = order[p + 1], j2 = order[p + 2], j3 = order[p + 3];
          const A c0 = g[j0], c1 = g[j1], c2 = g[j2], c3 = g[j3];
          s += ((c0 + c1) + c2) + c3;
          if (gW) {
            const T* x0 = x + (int64_t)rows[j0] * d_in;
            const T* x1 = x + (int64_t)rows[j1] * d_in;
            const T* x2 = x + (int64_t)rows[j2] * d_in;
            const T* x3 = x + (int64_t)rows[j3] * d_in;
#pragma omp simd
            for (int64_t i = 0; i < d_in; ++i) {
              al[i] += (c0 * static_cast<A>(x0[i]) + c1 * static_cast<A>(x1[i])) +
                       (c2 * static_cast<A>(x2[i]) + c3 * static_cast<A>(x3[i]));
            }
          }
        }
        for (; p < starts[l + 1]; ++p) {
          const int64_t j = order[p];
          const A gj = g[j];
          s += gj;
          if (gW) {
            const T* xr = x + (int64_t)rows[j] * d_in;
            for (int64_t i = 0; i < d_in; ++i) al[i] += gj * static_cast<A>(xr[i]);
          }
        }
        ls[l] = s;
      }
      if (gW) {
        for (int64_t i = 0; i < d_in; ++i) {
          T* out = gW + i * d_sae + l0;
          for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(acc[c * d_in + i]);
        }
      }
    }
  });
}

// lat_sum [d_sae] (acc dtype) and, when out_W is given, grad_W_enc [d_in, d_sae] written into it.
// g_values is in the accumulation dtype (float, or double for double inputs).
std::vector<at::Tensor> encode_backward_weight(const at::Tensor& g_values, const at::Tensor& xc, const at::Tensor& indices,
                                               const at::Tensor& row_ids, int64_t d_sae,
                                               const c10::optional<at::Tensor>& out_W) {
  TORCH_CHECK(xc.is_contiguous() && g_values.is_contiguous(), "encode_backward_weight: layouts");
  at::Tensor lat_sum = at::empty({d_sae}, g_values.options());
  at::Tensor gW = out_W.has_value() ? *out_W : at::Tensor();
  if (gW.defined()) TORCH_CHECK(gW.is_contiguous() && gW.size(0) == xc.size(1) && gW.size(1) == d_sae,
                                "encode_backward_weight: out_W");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "encode_backward_weight", [&] {
    encode_backward_weight_impl<scalar_t>(g_values, xc, indices, row_ids, d_sae, gW.defined() ? &gW : nullptr, lat_sum);
  });
  return {lat_sum, gW};
}

template <typename T>
void decoder_norm_impl(at::Tensor& W_dec, at::Tensor* grad, bool normalize, double eps) {
  using A = typename Acc<T>::type;
  const int64_t d_sae = W_dec.size(0), d_in = W_dec.size(1);
  T* W = W_dec.data_ptr<T>();
  T* G = grad ? grad->data_ptr<T>() : nullptr;
  at::parallel_for(0, d_sae, 512, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      T* w = W + l * d_in;
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < d_in; ++i) sq += static_cast<A>(w[i]) * static_cast<A>(w[i]);
      const A norm = std::max<A>(std::sqrt(sq), static_cast<A>(eps));
      if (G) {
        T* g = G + l * d_in;
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d_in; ++i) dot += static_cast<A>(g[i]) * static_cast<A>(w[i]);
        const A scale = dot / (norm * norm);
        for (int64_t i = 0; i < d_in; ++i) g[i] = static_cast<T>(static_cast<A>(g[i]) - scale * static_cast<A>(w[i]));
      }
      if (normalize) {
        const A inv = A(1) / norm;
        for (int64_t i = 0; i < d_in; ++i) w[i] = static_cast<T>(static_cast<A>(w[i]) * inv);
      }
    }
  });
}

// In place: grad made orthogonal to each W_dec row (when grad is given), then rows to unit norm
// (when normalize).
void decoder_norm_(at::Tensor W_dec, const c10::optional<at::Tensor>& grad, bool normalize, double eps) {
  TORCH_CHECK(W_dec.dim() == 2 && W_dec.is_contiguous(), "decoder_norm_: W_dec");
  at::Tensor g = grad.has_value() ? *grad : at::Tensor();
  if (g.defined()) TORCH_CHECK(g.is_contiguous() && g.sizes() == W_dec.sizes() && g.scalar_type() == W_dec.scalar_type(),
                               "decoder_norm_: grad");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "decoder_norm_", [&] {
    decoder_norm_impl<scalar_t>(W_dec, g.defined() ? &g : nullptr, normalize, eps);
  });
}

}  // namespace

TORCH_LIBRARY(saefast_cpu, m) {
  m.def("decoder_norm_(Tensor(a!) W_dec, Tensor(b!)? grad, bool normalize, float eps) -> ()", &decoder_norm_);
  m.def("encode_select(Tensor xc, Tensor W_enc, Tensor? b_enc, int mode, int k, Tensor? dead_mask, int k_aux, "
        "int block_cols, int aux_keep=0, bool aux_exclude_fired=False) -> Tensor[]", &encode_select);
  m.def("decode_forward(Tensor values, Tensor indices, Tensor offsets, Tensor W_dec) -> Tensor",
        &decode_forward);
  m.def("decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor row_ids, Tensor W_dec, "
        "bool need_values, Tensor? out_W) -> Tensor[]", &decode_backward);
  m.def("encode_backward_weight(Tensor g_values, Tensor xc, Tensor indices, Tensor row_ids, int d_sae, "
        "Tensor? out_W) -> Tensor[]", &encode_backward_weight);
}
