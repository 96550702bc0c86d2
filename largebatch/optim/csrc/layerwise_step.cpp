// Fused LAMB and LARS steps for contiguous CPU tensors (float32 or float64), called through ctypes.
//
// One call updates every tensor of a parameter bucket. Each tensor needs two passes, because its
// trust ratio needs the norm of the whole update before any element may change:
//   pass 1 updates the moments in place and accumulates ||x||^2 and ||u||^2,
//   pass 2 applies x += scale * u.
// LAMB's u costs a square root and a division per element. Pass 1 leaves the u of the last
// elements of each thread's range in a per-thread buffer that pass 2 reads (the buffers in use take
// at most a fifth of the bucket's size); for the other elements pass 2 recomputes u from the updated
// moments. With update_to_grad (Lamb(update_in_grad=True)) pass 1 stores every u over its gradient
// element instead and pass 2 reads it there: nothing is recomputed and no buffer is used.
// Without a cross-shard reduction both passes of a tensor run back to back, and pass 2
// walks its range backwards, starting with the data that pass 1 touched last (still in cache).
//
// Tensors are processed last to first: a step usually follows a pass over the gradients in list
// order (a finiteness check, a global norm), whose last tensors are then still in cache.
//
// Threads: a tensor with at least a quarter of a thread's share of all elements is cut into one
// contiguous range per thread (one barrier between its two passes); smaller tensors are taken
// whole by whichever thread is free. Partial sums are combined in a fixed order, so a result depends
// only on the thread count.
//
// The element formulas follow the multi-tensor reference (largebatch/optim/lamb.py, lars.py)
// operation by operation, except that divisions by a per-tensor bias correction are multiplications
// by its reciprocal (each per-tensor coefficient is computed in double and rounded once). Squared
// sums are accumulated per block in the element type, then in double. Float squares underflow
// below ~1e-19 and overflow above ~1e19, so a float tensor whose sum falls outside [1e-30, 1e30]
// has its sums taken again in double (recomputed from the state pass 1 left, as pass 2 does); the
// torch paths square in float64 throughout. (Squaring every element in double costs 7% of a step.)
//
// Build: c++ -O3 -march=native -fopenmp -fno-math-errno -ffp-contract=off -shared -fPIC with the -D flags
// at the end of this file (see largebatch/optim/_fused.py).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kSplitMin = 1 << 15;  // elements; below this a tensor is never split across threads
constexpr int64_t kBlock = 4096;        // elements per partial sum and per backward step of pass 2
constexpr int64_t kKeepMax = 1 << 22;   // LAMB: at most this many elements of u per thread are kept for pass 2
constexpr int64_t kAlign = 16;          // split points are multiples of this (one 64-byte line of floats)

enum GradType { kGradSame = 0, kGradBF16 = 1, kGradF16 = 2 };

template <typename T, int G>
struct GradLoad;
template <typename T>
struct GradLoad<T, kGradSame> {
  static inline T at(const void* g, int64_t i) { return static_cast<const T*>(g)[i]; }
};
template <>
struct GradLoad<float, kGradBF16> {
  static inline float at(const void* g, int64_t i) {
    uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(g)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};
template <>
struct GradLoad<float, kGradF16> {
  static inline float at(const void* g, int64_t i) { return static_cast<float>(static_cast<const _Float16*>(g)[i]); }
};


}  // namespace

extern "C" {

// Everything a step needs, filled by the Python side (a ctypes.Structure with the same layout).
struct StepArgs {
  int64_t n;              // number of tensors
  void** x;               // parameters (T)
  const void** g;         // gradients (T, or bf16/f16 for float32 parameters: grad_type)
  void** s1;              // LAMB: exp_avg; LARS: momentum buffer
  void** s2;              // LAMB: exp_avg_sq; LARS: unused
  float** step;           // LAMB: 0-d float32 step counters; LARS: unused
  const int64_t* numel;
  void* w_norm;           // out: n values of T
  void* d_norm;           // out: n values of T (||u||, or the direction / gradient norm of LARS)
  void* ratio;            // out (stage 0, 1) or in (stage 2): n values of T
  double* sq;             // out (stage 1): 2n squared sums [w..., d...]
  int32_t grad_type;
  int32_t stage;          // 0: both passes per tensor; 1: pass 1 only (sums out); 2: pass 2 only (ratio in)
  int32_t num_threads;
  int32_t nesterov;       // LAMB: 0 none, 1 first, 2 both; LARS: 0/1
  int32_t classic;        // LARS mode "classic"
  int32_t bias_correction;
  int32_t adapt;
  int32_t trust_clip;     // ratio clamped to [clip_lo, clip_hi] (LAMB trust_clip, LARS paper clip: [0, 1])
  int32_t lr_clip;        // LARS classic clip: min(ratio / lr, 1), or 1 when lr == 0
  int32_t has_phi;
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
  double coefficient;     // trust coefficient
  double ratio_eps;       // added to the ratio's denominator
  double ratio_wd;        // times ||x||, added to the ratio's denominator (LARS classic)
  double phi_lo, phi_hi;
  double clip_lo, clip_hi;
  double decay;           // LAMB: x is multiplied by this before the ratio sees it (1 - lr * lambda, or 1)
  double norm_wd;         // LARS classic: the measured norm is ||g + norm_wd x|| (0: ||g||)
  int32_t lr_in_momentum; // LARS classic: b = mom b + lr d, x -= b (TensorFlow, optax); 0: x -= lr b
  double beta3;           // LAMB: the factor of g in the first moment (1 - beta1, or 1 without grad averaging)
  double eps_root;        // LAMB: added to v_hat inside the square root (exactly nothing when 0)
  int32_t update_to_grad; // LAMB, gradients of the parameter's dtype: pass 1 stores u over g, pass 2 reads it there
  double grad_unscale;    // != 0 (gradients of the parameter's dtype): pass 1 multiplies g by it and stores it back
                          // (a GradScaler's 1 / scale, as its unscale_ would); grad_scale then applies on top
};

}  // extern "C"

namespace {

// Pass 1's gradient element. With UNSCALE (gradients of the parameter's dtype only) it is first
// multiplied by `unscale` and stored back, leaving the gradient as GradScaler.unscale_ would; every
// later read (pass 2, sums taken again) then finds the unscaled value.
template <typename T, int G, bool UNSCALE>
inline T pass1_grad(const void* g, int64_t j, T unscale) {
  T v = GradLoad<T, G>::at(g, j);
  if (UNSCALE) {
    v = v * unscale;
    static_cast<T*>(const_cast<void*>(g))[j] = v;
  }
  return v;
}

inline bool unscaling(const StepArgs& a, int grad_type) { return grad_type == kGradSame && a.grad_unscale != 0.0; }


template <typename T>
struct Sums {
  double w = 0.0, d = 0.0;
};

// Float sums that may have lost their small squares to underflow, or overflowed: take them again in double.
template <typename T>
bool retake_in_double(const Sums<T>& s) {
  if (sizeof(T) >= sizeof(double)) return false;
  auto off = [](double v) { return !(v >= 1e-30 && v <= 1e30); };  // 0 too: every square may have underflowed
  return off(s.w) || off(s.d);
}

// The per-tensor ratio, as largebatch.optim._common.trust_ratio computes it (in T).
template <typename T>
T ratio_of(const StepArgs& a, T w, T d) {
  if (!a.adapt) return T(1);
  T extra = T(a.ratio_wd) * w + T(a.ratio_eps);
  if (a.ratio_wd == 0.0) extra = T(a.ratio_eps);
  T denom = d + extra;
  T phw = a.has_phi ? std::min(std::max(w, T(a.phi_lo)), T(a.phi_hi)) : w;
  T r = T(a.coefficient) * phw / (denom > T(0) ? denom : T(1));
  if (a.trust_clip) r = std::min(std::max(r, T(a.clip_lo)), T(a.clip_hi));
  if (!(w > T(0) && d > T(0))) r = T(1);
  if (a.lr_clip) r = a.lr > 0.0 ? std::min(r / T(a.lr), T(1)) : T(1);
  return r;
}

// ------------------------------------------------------------------------------------------------
// LAMB. Per-tensor coefficients (from the step count t, after its increment):
//   m_hat = m * am + g * ag      am = 1/bc1(t), ag = 0; Nesterov: am = beta1/bc1(t+1), ag = beta3/bc1(t)
//   v_hat = v * bv + g^2 * bg    bv = 1/bc2(t), bg = 0; "both":   bv = beta2/bc2(t+1), bg = (1-beta2)/bc2(t)
template <typename T>
struct LambCoef {
  T am, ag, bv, bg;
};

// In double whatever T is: in float, 1 - 0.999^t loses five digits to cancellation.
inline double bias_correction(const StepArgs& a, double beta, double k) {
  if (!a.bias_correction || !(k > 0.0)) return 1.0;
  return 1.0 - std::pow(beta, k);
}

template <typename T, int G, int NEST, bool EPS0>
struct Lamb {
  const StepArgs& a;
  const std::vector<LambCoef<T>>& coef;
  T b1, c1, b2, c2, eps, er, wd, gs, sh;

  Lamb(const StepArgs& args, const std::vector<LambCoef<T>>& c)
      : a(args), coef(c), b1(T(args.beta1)), c1(T(args.beta3)), b2(T(args.beta2)),
        c2(T(1.0 - args.beta2)), eps(T(args.eps)), er(T(args.eps_root)), wd(T(args.weight_decay)),
        gs(T(args.grad_scale)),
        sh(T(args.decay)) {}

  static inline T direction(T m, T v, T g, T x, const LambCoef<T>& k, T eps, T er, T wd) {
    T mh = m * k.am;
    if (NEST >= 1) mh = mh + g * k.ag;
    T vh = v * k.bv;
    if (NEST == 2) vh = vh + (g * g) * k.bg;
    T den = std::sqrt(vh + er) + eps;
    T u = mh / den;
    if (EPS0) u = den > T(0) ? u : T(0);  // eps == 0: 0, not 0/0, where sqrt(v_hat) is 0
    return u + x * wd;
  }

  static constexpr bool kKeeps = true;  // pass 1 can leave u in a buffer for pass 2

  // The gradient's memory, which holds u after pass 1 (update_to_grad), or nullptr.
  T* in_grad(int64_t i) const {
    return (G == kGradSame && a.update_to_grad) ? static_cast<T*>(const_cast<void*>(a.g[i])) : nullptr;
  }

  void pass1(int64_t i, int64_t lo, int64_t hi, Sums<T>& s, T* keep) const {
    if (unscaling(a, G)) {
      pass1_keep<true>(i, lo, hi, s, keep);
    } else {
      pass1_keep<false>(i, lo, hi, s, keep);
    }
  }

  template <bool UNSCALE>
  void pass1_keep(int64_t i, int64_t lo, int64_t hi, Sums<T>& s, T* keep) const {
    if (in_grad(i) != nullptr) {
      pass1_impl<2, UNSCALE>(i, lo, hi, s, nullptr);
    } else if (keep != nullptr) {
      pass1_impl<1, UNSCALE>(i, lo, hi, s, keep);
    } else {
      pass1_impl<0, UNSCALE>(i, lo, hi, s, nullptr);
    }
  }

  // KEEP 0: u is not kept; 1: u of [lo, hi) goes to keep[0, hi - lo); 2: u replaces g.
  template <int KEEP, bool UNSCALE>
  void pass1_impl(int64_t i, int64_t lo, int64_t hi, Sums<T>& s, T* __restrict keep) const {
    T* __restrict x = static_cast<T*>(a.x[i]);
    const void* g = a.g[i];
    T* __restrict m = static_cast<T*>(a.s1[i]);
    T* __restrict v = static_cast<T*>(a.s2[i]);
    const LambCoef<T> k = coef[i];
    const T b1 = this->b1, c1 = this->c1, b2 = this->b2, c2 = this->c2, eps = this->eps, wd = this->wd, gs = this->gs;
    const T er = this->er;
    const T un = T(a.grad_unscale);
    const T sh = this->sh;  // 1, or 1 - lr * lambda: x as the ratio sees it is x * sh (exact when 1)
    for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
      const int64_t j1 = std::min(hi, j0 + kBlock);
      T sw = 0, su = 0;
#pragma omp simd reduction(+ : sw, su)
      for (int64_t j = j0; j < j1; ++j) {
        const T gj = pass1_grad<T, G, UNSCALE>(g, j, un) * gs;
        const T mj = std::fma(gj, c1, m[j] * b1);  // ATen's add(alpha=) is a fused multiply-add
        const T vj = v[j] * b2 + (c2 * gj) * gj;
        m[j] = mj;
        v[j] = vj;
        const T xj = x[j] * sh;
        const T u = direction(mj, vj, gj, xj, k, eps, er, wd);
        if (KEEP == 1) keep[j - lo] = u;
        if (KEEP == 2) static_cast<T*>(const_cast<void*>(g))[j] = u;  // g[j] was read above
        sw += xj * xj;
        su += u * u;
      }
      s.w += double(sw);
      s.d += double(su);
    }
  }

  // The sums of pass 1 again, in double, from the moments pass 1 wrote (u as pass 2 recomputes it).
  void sums_double(int64_t i, int64_t lo, int64_t hi, Sums<T>& s) const {
    const T* x = static_cast<const T*>(a.x[i]);
    const T* m = static_cast<const T*>(a.s1[i]);
    const T* v = static_cast<const T*>(a.s2[i]);
    const LambCoef<T> k = coef[i];
    const T* stored = in_grad(i);
    for (int64_t j = lo; j < hi; ++j) {
      const T xj = x[j] * sh;
      double u;
      if (stored != nullptr) {
        u = double(stored[j]);
      } else {
        const T gj = NEST >= 1 ? GradLoad<T, G>::at(a.g[i], j) * gs : T(0);
        u = double(direction(m[j], v[j], gj, xj, k, eps, er, wd));
      }
      s.w += double(xj) * double(xj);
      s.d += u * u;
    }
  }

  void pass2(int64_t i, int64_t lo, int64_t hi, T ratio, const T* __restrict keep) const {
    T* __restrict x = static_cast<T*>(a.x[i]);
    const T scale = T(-a.lr) * ratio;
    const T sh = this->sh;
    if (in_grad(i) != nullptr) keep = in_grad(i) + lo;
    if (keep != nullptr) {  // u from pass 1
      for (int64_t j1 = hi; j1 > lo; j1 -= kBlock) {
        const int64_t j0 = std::max(lo, j1 - kBlock);
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) x[j] = x[j] * sh + keep[j - lo] * scale;
      }
      return;
    }
    const void* g = a.g[i];
    const T* __restrict m = static_cast<const T*>(a.s1[i]);
    const T* __restrict v = static_cast<const T*>(a.s2[i]);
    const LambCoef<T> k = coef[i];
    const T eps = this->eps, er = this->er, wd = this->wd, gs = this->gs;
    for (int64_t j1 = hi; j1 > lo; j1 -= kBlock) {
      const int64_t j0 = std::max(lo, j1 - kBlock);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T gj = NEST >= 1 ? GradLoad<T, G>::at(g, j) * gs : T(0);
        const T xj = x[j] * sh;
        x[j] = xj + direction(m[j], v[j], gj, xj, k, eps, er, wd) * scale;
      }
    }
  }

  T ratio(int64_t, T w, T d) const { return ratio_of<T>(a, w, d); }
};

// ------------------------------------------------------------------------------------------------
// What both LARS modes share: pass 1 (D::pass1_impl) with or without unscaling, no kept u.
template <typename D, typename T, int G>
struct LarsBase {
  static constexpr bool kKeeps = false;
  T* in_grad(int64_t) const { return nullptr; }

  void pass1(int64_t i, int64_t lo, int64_t hi, Sums<T>& s, T*) const {
    const D& d = static_cast<const D&>(*this);
    if (unscaling(d.a, G)) {
      d.template pass1_impl<true>(i, lo, hi, s);
    } else {
      d.template pass1_impl<false>(i, lo, hi, s);
    }
  }
};

// LARS, "paper" mode: d = g + wd x; b = mom b + (1 - mom) d; n = b or mom b + (1 - mom) d.
template <typename T, int G, bool NEST>
struct LarsPaper : LarsBase<LarsPaper<T, G, NEST>, T, G> {
  const StepArgs& a;
  T mom, c, wd, gs;

  explicit LarsPaper(const StepArgs& args)
      : a(args), mom(T(args.beta1)), c(T(1.0 - args.beta1)), wd(T(args.weight_decay)), gs(T(args.grad_scale)) {}

  template <bool UNSCALE>
  void pass1_impl(int64_t i, int64_t lo, int64_t hi, Sums<T>& s) const {
    const T* __restrict x = static_cast<const T*>(a.x[i]);
    const void* g = a.g[i];
    T* __restrict b = static_cast<T*>(a.s1[i]);
    const T mom = this->mom, c = this->c, wd = this->wd, gs = this->gs, un = T(a.grad_unscale);
    for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
      const int64_t j1 = std::min(hi, j0 + kBlock);
      T sw = 0, sd = 0;
#pragma omp simd reduction(+ : sw, sd)
      for (int64_t j = j0; j < j1; ++j) {
        const T xj = x[j];
        const T dj = std::fma(xj, wd, pass1_grad<T, G, UNSCALE>(g, j, un) * gs);
        const T bj = b[j] * mom + dj * c;
        b[j] = bj;
        const T nj = NEST ? bj * mom + dj * c : bj;
        sw += xj * xj;
        sd += nj * nj;
      }
      s.w += double(sw);
      s.d += double(sd);
    }
  }

  void sums_double(int64_t i, int64_t lo, int64_t hi, Sums<T>& s) const {
    const T* x = static_cast<const T*>(a.x[i]);
    const T* b = static_cast<const T*>(a.s1[i]);
    for (int64_t j = lo; j < hi; ++j) {
      const T xj = x[j];
      T nj = b[j];
      if (NEST) nj = nj * mom + std::fma(xj, wd, GradLoad<T, G>::at(a.g[i], j) * gs) * c;
      s.w += double(xj) * double(xj);
      s.d += double(nj) * double(nj);
    }
  }

  void pass2(int64_t i, int64_t lo, int64_t hi, T ratio, const T*) const {
    T* __restrict x = static_cast<T*>(a.x[i]);
    const void* g = a.g[i];
    const T* __restrict b = static_cast<const T*>(a.s1[i]);
    const T mom = this->mom, c = this->c, wd = this->wd, gs = this->gs;
    const T scale = T(-a.lr) * ratio;
    for (int64_t j1 = hi; j1 > lo; j1 -= kBlock) {
      const int64_t j0 = std::max(lo, j1 - kBlock);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T xj = x[j];
        T nj = b[j];
        if (NEST) nj = nj * mom + std::fma(xj, wd, GradLoad<T, G>::at(g, j) * gs) * c;
        x[j] = xj + nj * scale;
      }
    }
  }

  T ratio(int64_t, T w, T d) const { return ratio_of<T>(a, w, d); }
};

// LARS, "classic" mode: the ratio uses ||g|| (or ||g + wd x||); d = (g + wd x) ratio; b = mom b + d;
// x -= lr (b or d + mom b). With lr_in_momentum: d is multiplied by lr before the buffer and x -= b
// (or d + mom b); multiplying by 1 and by -1 instead keeps the default bit-identical.
template <typename T, int G, bool NEST>
struct LarsClassic : LarsBase<LarsClassic<T, G, NEST>, T, G> {
  const StepArgs& a;
  T mom, wd, gs, nwd;

  explicit LarsClassic(const StepArgs& args)
      : a(args), mom(T(args.beta1)), wd(T(args.weight_decay)), gs(T(args.grad_scale)), nwd(T(args.norm_wd)) {}

  template <bool UNSCALE>
  void pass1_impl(int64_t i, int64_t lo, int64_t hi, Sums<T>& s) const {
    const T* __restrict x = static_cast<const T*>(a.x[i]);
    const void* g = a.g[i];
    const T gs = this->gs, nwd = this->nwd, un = T(a.grad_unscale);
    for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
      const int64_t j1 = std::min(hi, j0 + kBlock);
      T sw = 0, sg = 0;
#pragma omp simd reduction(+ : sw, sg)
      for (int64_t j = j0; j < j1; ++j) {
        const T xj = x[j];
        const T gj = std::fma(xj, nwd, pass1_grad<T, G, UNSCALE>(g, j, un) * gs);  // exactly g when nwd == 0
        sw += xj * xj;
        sg += gj * gj;
      }
      s.w += double(sw);
      s.d += double(sg);
    }
  }

  void sums_double(int64_t i, int64_t lo, int64_t hi, Sums<T>& s) const {
    const T* x = static_cast<const T*>(a.x[i]);
    for (int64_t j = lo; j < hi; ++j) {
      const T xj = x[j];
      const T gj = std::fma(xj, nwd, GradLoad<T, G>::at(a.g[i], j) * gs);
      s.w += double(xj) * double(xj);
      s.d += double(gj) * double(gj);
    }
  }

  void pass2(int64_t i, int64_t lo, int64_t hi, T ratio, const T*) const {
    T* __restrict x = static_cast<T*>(a.x[i]);
    const void* g = a.g[i];
    T* __restrict b = static_cast<T*>(a.s1[i]);
    const T mom = this->mom, wd = this->wd, gs = this->gs;
    const T into = a.lr_in_momentum ? T(a.lr) : T(1);
    const T scale = a.lr_in_momentum ? T(-1) : T(-a.lr);
    for (int64_t j1 = hi; j1 > lo; j1 -= kBlock) {
      const int64_t j0 = std::max(lo, j1 - kBlock);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T xj = x[j];
        const T dj = std::fma(xj, wd, GradLoad<T, G>::at(g, j) * gs) * ratio * into;
        const T bj = b[j] * mom + dj;
        b[j] = bj;
        const T nj = NEST ? dj + bj * mom : bj;
        x[j] = xj + nj * scale;
      }
    }
  }

  T ratio(int64_t, T w, T d) const { return ratio_of<T>(a, w, d); }
};

// ------------------------------------------------------------------------------------------------
// The driver: splits the work over threads and runs the stage's passes.
// A per-thread buffer of at least n elements, kept for the next call (it only grows).
template <typename T>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

inline void split_range(int64_t numel, int tid, int nt, int64_t& lo, int64_t& hi) {
  const int64_t units = (numel + kAlign - 1) / kAlign;
  lo = std::min(numel, (units * tid / nt) * kAlign);
  hi = std::min(numel, (units * (tid + 1) / nt) * kAlign);
}

template <typename T, typename K>
void drive(const StepArgs& a, const K& k) {
  const int64_t n = a.n;
  T* w_out = static_cast<T*>(a.w_norm);
  T* d_out = static_cast<T*>(a.d_norm);
  T* r_io = static_cast<T*>(a.ratio);
  const int want = std::max(1, a.num_threads);

  // Tensors of at least a quarter of a thread's share are split over the threads; the others are
  // taken whole, one at a time, by whichever thread is free (no barrier, and a thread that the OS
  // holds up does not hold up the other). Both lists run from the last tensor to the first.
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += a.numel[i];
  const int64_t split_min = std::max(kSplitMin, total / (4 * int64_t(want)));
  // The kept u of the ranges in flight take at most a fifth of the parameters' size.
  const int64_t keep_max = std::min(kKeepMax, total / (5 * int64_t(want)));
  std::vector<int64_t> whole, split;
  for (int64_t i = n - 1; i >= 0; --i) (want > 1 && a.numel[i] >= split_min ? split : whole).push_back(i);
  std::vector<Sums<T>> part(static_cast<size_t>(n) * want);  // [tensor][thread]
  std::vector<Sums<T>> redo(static_cast<size_t>(n) * want);  // the same in double, where retaken
  const int64_t n_whole = static_cast<int64_t>(whole.size());
  // A whole tensor's sums, taken again in double when the float ones may be off.
  auto checked = [&](int64_t i, Sums<T>& s) -> Sums<T>& {
    if (retake_in_double(s)) {
      s = Sums<T>{};
      k.sums_double(i, 0, a.numel[i], s);
    }
    return s;
  };

  auto finish = [&](int64_t i, const Sums<T>& s) -> T {
    const T w = T(std::sqrt(s.w));
    const T d = T(std::sqrt(s.d));
    const T r = k.ratio(i, w, d);
    w_out[i] = w;
    d_out[i] = d;
    r_io[i] = r;
    return r;
  };

  // Both passes over [lo, hi); ratio_of_sums() is called between them. The last keep_max elements
  // keep their u for pass 2 (which starts with them), the others recompute it.
  auto both_passes = [&](int64_t i, int64_t lo, int64_t hi, Sums<T>& sums, auto ratio_of_sums) {
    const int64_t mid = K::kKeeps && k.in_grad(i) == nullptr ? std::max(lo, hi - keep_max) : hi;
    T* keep = mid < hi ? thread_buffer<T>(hi - mid) : nullptr;
    k.pass1(i, lo, mid, sums, nullptr);
    if (keep != nullptr) k.pass1(i, mid, hi, sums, keep);
    const T r = ratio_of_sums();
    if (keep != nullptr) k.pass2(i, mid, hi, r, keep);
    k.pass2(i, lo, mid, r, nullptr);
  };

#pragma omp parallel num_threads(want)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t idx = 0; idx < n_whole; ++idx) {
      const int64_t i = whole[idx];
      if (a.stage == 2) {
        k.pass2(i, 0, a.numel[i], r_io[i], nullptr);
        continue;
      }
      Sums<T>& mine = part[static_cast<size_t>(i) * want];
      if (a.stage == 1) {
        k.pass1(i, 0, a.numel[i], mine, nullptr);
        checked(i, mine);
      } else {
        both_passes(i, 0, a.numel[i], mine, [&] { return finish(i, checked(i, mine)); });
      }
    }
    for (const int64_t i : split) {
      int64_t lo, hi;
      split_range(a.numel[i], tid, team, lo, hi);
      if (a.stage == 2) {
        k.pass2(i, lo, hi, r_io[i], nullptr);
        continue;
      }
      Sums<T>& mine = part[static_cast<size_t>(i) * want + tid];
      if (a.stage == 1) {
        k.pass1(i, lo, hi, mine, nullptr);
        continue;
      }
      both_passes(i, lo, hi, mine, [&] {
#pragma omp barrier
        Sums<T> sum;
        for (int t = 0; t < team; ++t) {
          sum.w += part[static_cast<size_t>(i) * want + t].w;
          sum.d += part[static_cast<size_t>(i) * want + t].d;
        }
        if (retake_in_double(sum)) {  // every thread sees the same sums, so all take this branch
          Sums<T>& again = redo[static_cast<size_t>(i) * want + tid];
          k.sums_double(i, lo, hi, again);
#pragma omp barrier
          sum = Sums<T>{};
          for (int t = 0; t < team; ++t) {
            sum.w += redo[static_cast<size_t>(i) * want + t].w;
            sum.d += redo[static_cast<size_t>(i) * want + t].d;
          }
        }
        return tid == 0 ? finish(i, sum) : k.ratio(i, T(std::sqrt(sum.w)), T(std::sqrt(sum.d)));
      });
    }
  }

  if (a.stage == 1) {
    for (int64_t i = 0; i < n; ++i) {
      Sums<T> sum;
      for (int t = 0; t < want; ++t) {
        sum.w += part[static_cast<size_t>(i) * want + t].w;
        sum.d += part[static_cast<size_t>(i) * want + t].d;
      }
      if (want > 1 && a.numel[i] >= split_min) checked(i, sum);  // whole tensors were checked above
      a.sq[i] = sum.w;
      a.sq[n + i] = sum.d;
    }
  }
}

template <typename T, int G>
void lamb_typed(const StepArgs& a) {
  std::vector<LambCoef<T>> coef(a.n);
  for (int64_t i = 0; i < a.n; ++i) {
    if (a.stage != 2) *a.step[i] += 1.0f;
    // Each coefficient is computed in double and rounded to T once, as the torch paths do.
    const double t = double(*a.step[i]);
    const double bc1 = bias_correction(a, a.beta1, t);
    const double bc2 = bias_correction(a, a.beta2, t);
    LambCoef<T>& k = coef[i];
    k.am = T(1.0 / bc1);
    k.ag = T(0);
    k.bv = T(1.0 / bc2);
    k.bg = T(0);
    if (a.nesterov >= 1) {
      k.am = T(a.beta1 / bias_correction(a, a.beta1, t + 1.0));
      k.ag = T(a.beta3 / bc1);
    }
    if (a.nesterov == 2) {
      k.bv = T(a.beta2 / bias_correction(a, a.beta2, t + 1.0));
      k.bg = T((1.0 - a.beta2) / bc2);
    }
  }
  switch (a.nesterov * 2 + (a.eps == 0.0 ? 1 : 0)) {
    case 0: drive<T>(a, Lamb<T, G, 0, false>(a, coef)); break;
    case 1: drive<T>(a, Lamb<T, G, 0, true>(a, coef)); break;
    case 2: drive<T>(a, Lamb<T, G, 1, false>(a, coef)); break;
    case 3: drive<T>(a, Lamb<T, G, 1, true>(a, coef)); break;
    case 4: drive<T>(a, Lamb<T, G, 2, false>(a, coef)); break;
    default: drive<T>(a, Lamb<T, G, 2, true>(a, coef)); break;
  }
}

template <typename T, int G>
void lars_typed(const StepArgs& a) {
  switch (a.classic * 2 + (a.nesterov ? 1 : 0)) {
    case 0: drive<T>(a, LarsPaper<T, G, false>(a)); break;
    case 1: drive<T>(a, LarsPaper<T, G, true>(a)); break;
    case 2: drive<T>(a, LarsClassic<T, G, false>(a)); break;
    default: drive<T>(a, LarsClassic<T, G, true>(a)); break;
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Finiteness of many tensors: no element of any has an all-ones exponent (inf or nan).
template <typename U, U kMask>
bool any_nonfinite(const void* data, int64_t lo, int64_t hi) {
  // One core reads a single stream faster with software prefetches some kilobytes ahead.
  constexpr int64_t kStep = 64 / sizeof(U), kAhead = 8192 / sizeof(U), kSub = 256;
  const U* __restrict p = static_cast<const U*>(data);
  for (int64_t j0 = lo; j0 < hi; j0 += 16 * kBlock) {
    const int64_t j1 = std::min(hi, j0 + 16 * kBlock);
    unsigned bad = 0;
    for (int64_t s0 = j0; s0 < j1; s0 += kSub) {
      const int64_t s1 = std::min(j1, s0 + kSub);
      for (int64_t k = s0 + kAhead; k < std::min(s1 + kAhead, hi); k += kStep) __builtin_prefetch(p + k, 0, 3);
#pragma omp simd reduction(| : bad)
      for (int64_t j = s0; j < s1; ++j) bad |= static_cast<unsigned>((p[j] & kMask) == kMask);
    }
    if (bad) return true;
  }
  return false;
}

bool any_nonfinite_typed(int32_t type, const void* data, int64_t lo, int64_t hi) {
  switch (type) {
    case 0: return any_nonfinite<uint32_t, 0x7f800000u>(data, lo, hi);            // float32
    case 1: return any_nonfinite<uint64_t, 0x7ff0000000000000ull>(data, lo, hi);  // float64
    case 2: return any_nonfinite<uint16_t, 0x7f80u>(data, lo, hi);                // bfloat16
    default: return any_nonfinite<uint16_t, 0x7c00u>(data, lo, hi);               // float16
  }
}

#ifndef LB_SCALAR
#define LB_SCALAR float
#endif
#ifndef LB_GRAD
#define LB_GRAD 0
#endif
#if !defined(LB_LAMB) && !defined(LB_LARS)
#define LB_LAMB 1
#endif

extern "C" {

// Returns 1 when every element of the n tensors (type codes: 0 float32, 1 float64, 2 bfloat16,
// 3 float16) is finite. The elements of all tensors, end to end, are split evenly over the threads.
int lb_all_finite(int64_t n, const void* const* data, const int64_t* numel, const int32_t* type, int32_t num_threads) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += numel[i];
  int bad = 0;
#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(| : bad)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t lo, hi;
    split_range(total, tid, team, lo, hi);
    int64_t start = 0;
    for (int64_t i = 0; i < n && start < hi && !bad; start += numel[i], ++i) {
      const int64_t a = std::max(lo, start) - start, b = std::min(hi, start + numel[i]) - start;
      if (a < b && any_nonfinite_typed(type[i], data[i], a, b)) bad = 1;
    }
  }
  return bad ? 0 : 1;
}

// One build holds one optimizer for one (parameter, gradient) dtype pair, chosen with -D flags:
// -DLB_LAMB or -DLB_LARS, -DLB_SCALAR=float|double, -DLB_GRAD=0 (same as the parameter)|1 (bf16)|2 (f16).
int lb_step(const StepArgs* a) {
  if (a->grad_type != LB_GRAD) return 1;
#ifdef LB_LAMB
  lamb_typed<LB_SCALAR, LB_GRAD>(*a);
#else
  lars_typed<LB_SCALAR, LB_GRAD>(*a);
#endif
  return 0;
}

int lb_abi_version(void) { return 8; }

int lb_scalar_bytes(void) { return static_cast<int>(sizeof(LB_SCALAR)); }

}  // extern "C"
