// Memory-read probe behind docs/bench.md "What limits the ratio": how fast the cores read, what two
// other orders of LAMB's passes would cost, and how much of a buffer just read the caches still
// hold for a second pass, on plain arrays (no torch, no largebatch).
//
//   c++ -std=c++17 -O3 -march=native -fopenmp -fno-math-errno -ffp-contract=off benchmarks/read_probe.cpp -o /tmp/read_probe
//   /tmp/read_probe            # 25M float32 elements, 2 threads (READ_PROBE_N, READ_PROBE_THREADS override)
//
// Every time is the median of 15 runs, each after reading a buffer of 600 MiB (larger than the
// last-level cache) so that the arrays come from DRAM, as in `largebatch bench`.

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <utility>
#include <vector>

namespace {

int64_t n = 25'000'000;
int threads = 2;
float *x, *g, *m, *v;
std::vector<char> flush_buffer(600u << 20);

void flush() {
  volatile char sink = 0;
  for (size_t i = 0; i < flush_buffer.size(); i += 64) sink = sink + flush_buffer[i]++;
}

double median_ms(const std::function<void()>& body) {
  std::vector<double> t;
  for (int k = 0; k < 15; ++k) {
    flush();
    auto t0 = std::chrono::steady_clock::now();
    body();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void range(int tid, int64_t& lo, int64_t& hi) {
  lo = n * tid / threads;
  hi = n * (tid + 1) / threads;
}

// The non-finite check: one read of g, each thread reading its range as `streams` interleaved parts.
void check(int streams) {
  unsigned bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
  {
    int64_t lo, hi;
    range(omp_get_thread_num(), lo, hi);
    const int64_t len = (hi - lo) / streams;
    const uint32_t* p = reinterpret_cast<const uint32_t*>(g);
    for (int64_t j = 0; j < len; j += 256)
      for (int s = 0; s < streams; ++s) {
        const int64_t a = lo + s * len + j, b = lo + s * len + std::min(len, j + 256);
        unsigned local = 0;
#pragma omp simd reduction(| : local)
        for (int64_t q = a; q < b; ++q) local |= ((p[q] & 0x7f800000u) == 0x7f800000u);
        bad |= local;
      }
  }
  if (bad) std::printf("unexpected non-finite value\n");
}

inline float direction(float mj, float vj, float xj) { return mj / (std::sqrt(vj) + 1e-6f) + 0.01f * xj; }

// LAMB pass 1 as the kernel does it: read x, g, m, v; write m, v; sums of x^2 and u^2.
// write=false: read-only (the moments are recomputed by pass 2). prefetch: software prefetch ahead.
template <bool write, bool prefetch>
double pass1() {
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    int64_t lo, hi;
    range(omp_get_thread_num(), lo, hi);
    for (int64_t b = lo; b < hi; b += 4096) {
      const int64_t e = std::min(hi, b + 4096);
      if constexpr (prefetch)
        for (int64_t k = b + 4096; k < std::min(e + 4096, hi); k += 16) {
          __builtin_prefetch(x + k, 0, 3);
          __builtin_prefetch(g + k, 0, 3);
          __builtin_prefetch(m + k, 1, 3);
          __builtin_prefetch(v + k, 1, 3);
        }
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = b; j < e; ++j) {
        const float gj = g[j], mj = m[j] * 0.9f + 0.1f * gj, vj = v[j] * 0.999f + (0.001f * gj) * gj;
        if constexpr (write) {
          m[j] = mj;
          v[j] = vj;
        }
        const float u = direction(mj, vj, x[j]);
        s += u * u + x[j] * x[j];
      }
      total += s;
    }
  }
  return total;
}

// Pass 2: x += scale * u, u recomputed from the moments pass 1 wrote (read x, m, v; write x), or,
// after a read-only pass 1, from g with the moments written here (read x, g, m, v; write x, m, v).
template <bool moments_written>
void pass2() {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    float mj = m[j], vj = v[j];
    if constexpr (!moments_written) {
      const float gj = g[j];
      mj = mj * 0.9f + 0.1f * gj;
      vj = vj * 0.999f + (0.001f * gj) * gj;
      m[j] = mj;
      v[j] = vj;
    }
    x[j] -= 1e-9f * direction(mj, vj, x[j]);
  }
}

// Whether the caches keep streamed data for a second pass: one thread reads a buffer of `mib` MiB
// from DRAM, then reads it again at once. Returns (first read, second read) in GB/s, medians.
std::pair<double, double> reread(size_t mib) {
  const size_t count = (mib << 20) / sizeof(float);
  std::vector<float> buf(count, 1.0f);
  std::vector<double> first, second;
  for (int k = 0; k < 15; ++k) {
    flush();
    float sum = 0;
    auto t0 = std::chrono::steady_clock::now();
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < count; ++j) sum += buf[j];
    auto t1 = std::chrono::steady_clock::now();
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < count; ++j) sum += buf[j];
    auto t2 = std::chrono::steady_clock::now();
    if (sum == 0) std::printf("unexpected sum\n");
    first.push_back(std::chrono::duration<double>(t1 - t0).count());
    second.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  std::sort(first.begin(), first.end());
  std::sort(second.begin(), second.end());
  const double gb = double(count) * sizeof(float) / 1e9;
  return {gb / first[first.size() / 2], gb / second[second.size() / 2]};
}

void copy_pass() {  // a += 0.5 b over x and g: the bandwidth `largebatch bench` states (12 B per element)
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) x[j] += 0.5f * g[j] * 1e-9f;
}

}  // namespace

int main() {
  if (const char* s = std::getenv("READ_PROBE_N")) n = std::atoll(s);
  if (const char* s = std::getenv("READ_PROBE_THREADS")) threads = std::atoi(s);
  for (float** p : {&x, &g, &m, &v}) *p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = 0.01f * float(j % 97);
    g[j] = 1e-3f * float(j % 13 - 6);
    m[j] = 0;
    v[j] = 1e-8f;
  }
  const double mb = double(n) * 4 / 1e6;  // MB per array
  std::printf("%lld float32 elements, %d threads\n", static_cast<long long>(n), threads);
  const double a = median_ms(copy_pass);
  std::printf("a += 0.5 b (read 8 B, write 4 B per element): %.2f ms, %.1f GB/s\n", a, 3 * mb / a);
  for (int streams : {1, 2, 4, 8}) {
    const double t = median_ms([&] { check(streams); });
    std::printf("read-only check of g, %d stream(s) per thread: %.2f ms, %.1f GB/s\n", streams, t, mb / t);
  }
  const double c = median_ms([] { check(8); });
  const double p1 = median_ms([] { pass1<true, false>(); });
  const double p1f = median_ms([] { pass1<true, true>(); });
  const double p2 = median_ms([] { pass2<true>(); });
  const double r1 = median_ms([] { pass1<false, false>(); });
  const double r2 = median_ms([] { pass2<false>(); });
  std::printf("pass 1 (read 16 B, write 8 B): %.2f ms; with software prefetch: %.2f ms\n", p1, p1f);
  std::printf("pass 2 (read 12 B, write 4 B): %.2f ms\n", p2);
  std::printf("check + pass 1 + pass 2 (the kernel's order, 44 B): %.2f ms\n", c + p1 + p2);
  std::printf("read-only pass 1 (16 B) + read-write pass 2 (28 B), check folded in: %.2f + %.2f = %.2f ms\n", r1, r2,
              r1 + r2);
  for (size_t mib : {1, 2, 4, 8, 16, 32, 64}) {
    const auto [cold, again] = reread(mib);
    std::printf("one thread reads %zu MiB: %.1f GB/s from DRAM, %.1f GB/s read again at once\n", mib, cold, again);
  }
  return 0;
}
