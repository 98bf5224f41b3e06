// Metal side of the mlx-moe fused kernels: the names moe_common.h expects.
// MLX prepends its own utils (metal_stdlib, bfloat16_t, ...) to every
// mx.fast.metal_kernel; for Swift's MLXFast.metalKernel the same holds.
#include <metal_stdlib>
#include <metal_simdgroup>
using namespace metal;

#define MOE_METAL 1
#define DEVFN inline __attribute__((always_inline))
#define CONSTFN constexpr
#define GPTR(T) const device T*
#define UNROLL _Pragma("clang loop unroll(full)")

typedef uint32_t moe_u32;
typedef uint4 moe_u4;

DEVFN float moe_bits_to_float(moe_u32 b) {
  return as_type<float>(b);
}

DEVFN float moe_half_bits_to_float(moe_u32 b) {
  return float(as_type<half>(ushort(b)));
}

template <typename V>
DEVFN float moe_f32(V v) {
  return static_cast<float>(v);
}

template <int N>
DEVFN float moe_sg_sum(float v) {
  UNROLL for (ushort o = N / 2; o > 0; o >>= 1) {
    v += simd_shuffle_xor(v, o);
  }
  return v;
}

#define MOE_EXP(x) metal::precise::exp(x)
#define MOE_TANH(x) metal::precise::tanh(x)
#define MOE_ERF(x) moe_erf_approx(x)
