// CUDA side of the mlx-moe fused kernels: the names moe_common.h expects.
// mx.fast.cuda_kernel compiles this with NVRTC after MLX's own device
// utilities (cuda_bf16.h, cuda_fp16.h); the body lands in namespace
// mlx::core::cu, so every helper here is prefixed moe_ to stay unambiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MOE_CUDA 1
#define DEVFN __device__ __forceinline__
#define CONSTFN __host__ __device__ constexpr
#define GPTR(T) const T*
#define UNROLL _Pragma("unroll")

typedef unsigned int moe_u32;
typedef uint4 moe_u4;

DEVFN float moe_bits_to_float(moe_u32 b) {
  return __uint_as_float(b);
}

DEVFN float moe_half_bits_to_float(moe_u32 b) {
  return __half2float(__ushort_as_half((unsigned short)(b)));
}

DEVFN float moe_f32(float v) { return v; }
DEVFN float moe_f32(__half v) { return __half2float(v); }
DEVFN float moe_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
DEVFN float moe_f32(unsigned char v) { return float(v); }
DEVFN float moe_f32(int v) { return float(v); }
DEVFN float moe_f32(unsigned int v) { return float(v); }

template <int N>
DEVFN float moe_sg_sum(float v) {
  UNROLL for (int o = N / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

#define MOE_EXP(x) expf(x)
#define MOE_TANH(x) tanhf(x)
#define MOE_ERF(x) erff(x)
