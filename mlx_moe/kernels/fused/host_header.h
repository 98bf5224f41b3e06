// Host (CPU) emulation of the mlx-moe fused kernels, for tests only.
//
// Each threadblock runs as one fiber per thread (ucontext), one block at a
// time; moe_sg_sum exchanges values through a slot array between two block
// barriers, so the kernel bodies run unchanged with real lane semantics. A
// barrier reached by some threads of a block but not others (divergent
// control flow around a reduction) is reported as an error.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

#define MOE_HOST 1
#define DEVFN inline
#define CONSTFN constexpr
#define GPTR(T) const T*
#define UNROLL

typedef uint32_t moe_u32;
struct alignas(16) moe_u4 {
  moe_u32 x, y, z, w;
};

inline float moe_bits_to_float(moe_u32 b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline float moe_half_bits_to_float(moe_u32 b) {
  uint16_t s = uint16_t(b);
  _Float16 h;
  std::memcpy(&h, &s, 2);
  return float(h);
}

struct bf16_t {
  uint16_t bits;
  bf16_t() = default;
  explicit bf16_t(float f) {
    moe_u32 u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    return moe_bits_to_float(moe_u32(bits) << 16);
  }
};
typedef _Float16 f16_t;

template <typename V>
inline float moe_f32(V v) {
  return static_cast<float>(v);
}

namespace moe_emu {
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int tid;
  int calls;
  bool done;
};
inline ucontext_t sched;
inline Fiber* cur = nullptr;
inline int bx = 0, by = 0;
inline float slots[2][1024];
inline std::function<void()> body;
inline bool error = false;

inline void barrier() {
  swapcontext(&cur->ctx, &sched);
}

inline void trampoline() {
  body();
  cur->done = true;
}

inline std::vector<Fiber>& pool() {
  static std::vector<Fiber> fibers;
  return fibers;
}

// Runs `fn` as every thread of block (x, y) of `nthreads` threads.
inline bool run_block(int nthreads, int x, int y, std::function<void()> fn) {
  bx = x;
  by = y;
  body = fn;
  std::vector<Fiber>& all = pool();
  if ((int)all.size() < nthreads) {
    all.resize(nthreads);
  }
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = all[i];
    if (f.stack.empty()) {
      f.stack.resize(1 << 16);
    }
    f.tid = i;
    f.calls = 0;
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  while (true) {
    int ndone = 0;
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = all[i];
      if (f.done) {
        ++ndone;
        continue;
      }
      cur = &f;
      swapcontext(&sched, &f.ctx);
      ndone += f.done;
    }
    if (ndone == nthreads) {
      return true;
    }
    if (ndone > 0) {
      std::fprintf(stderr, "moe_emu: divergent barrier in block (%d, %d)\n", x, y);
      error = true;
      return false;
    }
  }
}
} // namespace moe_emu

// Sum over aligned groups of N lanes with the GPU's xor-butterfly order
// (bit-identical to the shuffle loops), one block barrier per call: every
// lane publishes its value, then replays the butterfly of its group. Two
// alternating slot buffers make the one barrier enough.
template <int N>
inline float moe_sg_sum(float v) {
  const int tid = moe_emu::cur->tid;
  const int buf = moe_emu::cur->calls++ & 1;
  float* slots = moe_emu::slots[buf];
  slots[tid] = v;
  moe_emu::barrier();
  const int base = tid & ~(N - 1);
  float vals[N];
  for (int i = 0; i < N; ++i) {
    vals[i] = slots[base + i];
  }
  for (int o = N / 2; o > 0; o >>= 1) {
    float next[N];
    for (int i = 0; i < N; ++i) {
      next[i] = vals[i] + vals[i ^ o];
    }
    for (int i = 0; i < N; ++i) {
      vals[i] = next[i];
    }
  }
  return vals[tid - base];
}

#define MOE_EXP(x) std::exp(x)
#define MOE_TANH(x) std::tanh(x)
#define MOE_ERF(x) std::erf(x)
