// mlx-moe grouped prefill: CPU emulation of the platform helpers, for tests only.
// Every thread of a block is an std::thread; PF_SHARED arrays are function
// statics shared by them; PF_BARRIER is an std::barrier. The warp tile is a
// scalar loop (lane l owns row wr + l), so this checks the body's indexing,
// dequantization, tiling and epilogue -- not the tensor-core helpers.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define PF_FUNC inline
#define PF_GLOBAL
#define PF_SMEM
#define PF_SHARED static
#define PF_UNROLL

extern std::barrier<>* pf_cpu_barrier;
#define PF_BARRIER() pf_cpu_barrier->arrive_and_wait()

typedef uint32_t pf_u32;
struct pf_u4 {
  uint32_t x, y, z, w;
};

struct pf_bf16 {
  uint16_t bits;
  pf_bf16() : bits(0) {}
  pf_bf16(float f) {  // round to nearest even, like MLX
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

PF_FUNC pf_u4 pf_u4_zero() { return pf_u4{0u, 0u, 0u, 0u}; }
PF_FUNC float pf_exp(float x) { return std::exp(x); }
PF_FUNC float pf_tanh(float x) { return std::tanh(x); }
PF_FUNC float pf_min(float a, float b) { return std::fmin(a, b); }
PF_FUNC float pf_max(float a, float b) { return std::fmax(a, b); }
PF_FUNC int pf_imin(int a, int b) { return a < b ? a : b; }
PF_FUNC pf_u32 pf_pack2(pf_bf16 lo, pf_bf16 hi) {
  return pf_u32(lo.bits) | (pf_u32(hi.bits) << 16);
}
PF_FUNC pf_u32 pf_pack2(_Float16 lo, _Float16 hi) {
  uint16_t a, b;
  std::memcpy(&a, &lo, 2);
  std::memcpy(&b, &hi, 2);
  return pf_u32(a) | (pf_u32(b) << 16);
}

PF_FUNC float pf_u2f(pf_u32 q) { return float(q); }
template <typename T>
PF_FUNC pf_u32 pf_pack2f(float lo, float hi, T) {
  return pf_pack2(T(lo), T(hi));
}

#ifdef PF_CPU_MMA16816
// Warp-collective emulation of mma.sync.m16n8k16.row.col (f32 += bf16/f16):
// lanes publish their fragments, then each computes its own D fragment from
// the PTX layout. The warp tile itself comes from prefill_mma16816.h.
extern thread_local int pf_cpu_lane, pf_cpu_warp;
extern std::barrier<>* pf_cpu_warp_barrier[];
extern uint32_t pf_cpu_stage[][32][6];

PF_FUNC float pf_half_bits(uint32_t w, int hi, pf_bf16) {
  pf_bf16 v;
  v.bits = uint16_t(hi ? (w >> 16) : (w & 0xffffu));
  return float(v);
}
PF_FUNC float pf_half_bits(uint32_t w, int hi, _Float16) {
  uint16_t b = uint16_t(hi ? (w >> 16) : (w & 0xffffu));
  _Float16 v;
  std::memcpy(&v, &b, 2);
  return float(v);
}

template <typename T>
PF_FUNC void pf_mma16816(float* d, const pf_u32* a, pf_u32 b0, pf_u32 b1, T tag) {
  const int w = pf_cpu_warp, lane = pf_cpu_lane;
  uint32_t* st = pf_cpu_stage[w][lane];
  st[0] = a[0]; st[1] = a[1]; st[2] = a[2]; st[3] = a[3]; st[4] = b0; st[5] = b1;
  pf_cpu_warp_barrier[w]->arrive_and_wait();
  const int g = lane >> 2, t = lane & 3;
  for (int v = 0; v < 4; v++) {
    const int row = g + (v >= 2 ? 8 : 0), col = 2 * t + (v & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; k++) {
      // A[row][k]: lane (row%8)*4 + (k%8)/2, reg (row>=8) + 2*(k>=8), half k%2
      const uint32_t* la = pf_cpu_stage[w][(row % 8) * 4 + (k % 8) / 2];
      const float av = pf_half_bits(la[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1, tag);
      // B[k][col]: lane col*4 + (k%8)/2, reg (k>=8), half k%2
      const uint32_t* lb = pf_cpu_stage[w][col * 4 + (k % 8) / 2];
      const float bv = pf_half_bits(lb[4 + (k >= 8 ? 1 : 0)], k & 1, tag);
      sum += av * bv;
    }
    d[v] += sum;
  }
  pf_cpu_warp_barrier[w]->arrive_and_wait();
}
#else
template <typename T>
struct PfWarpTile {
  float c[64];  // lane owns row wr + lane; c[h * 32 + j] is column h*64 + wc + j
  void zero() {
    for (int i = 0; i < 64; i++) c[i] = 0.0f;
  }
  void mma(const T* As, const T* Bs, int wr, int wc, int lane) {
    for (int k = 0; k < PF_BK; k++) {
      const float a = float(As[(wr + lane) * PF_LDS + k]);
      for (int h = 0; h < 2; h++) {
        for (int j = 0; j < 32; j++) {
          c[h * 32 + j] += a * float(Bs[(h * 64 + wc + j) * PF_LDS + k]);
        }
      }
    }
  }
  void store(float* Cs, int wr, int wc, int lane) {
    for (int h = 0; h < 2; h++) {
      for (int j = 0; j < 32; j++) {
        Cs[(wr + lane) * PF_LDC + h * 64 + wc + j] = c[h * 32 + j];
      }
    }
  }
};
#endif  // PF_CPU_MMA16816
