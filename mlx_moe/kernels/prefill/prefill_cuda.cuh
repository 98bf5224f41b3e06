// mlx-moe grouped prefill: CUDA platform helpers for prefill_body.inc
// (emitted through mx.fast.cuda_kernel, compiled by NVRTC inside MLX).
// The warp tile uses tensor cores: mma.sync.m16n8k16 (bf16 / f16 in, f32 acc).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define PF_FUNC __device__ __forceinline__
#define PF_GLOBAL
#define PF_SMEM
#define PF_SHARED __shared__
#define PF_BARRIER() __syncthreads()
#define PF_UNROLL _Pragma("unroll")

typedef uint32_t pf_u32;
typedef uint4 pf_u4;

PF_FUNC pf_u4 pf_u4_zero() { return make_uint4(0u, 0u, 0u, 0u); }
PF_FUNC float pf_exp(float x) { return expf(x); }
PF_FUNC float pf_tanh(float x) { return tanhf(x); }
PF_FUNC float pf_min(float a, float b) { return fminf(a, b); }
PF_FUNC float pf_max(float a, float b) { return fmaxf(a, b); }
PF_FUNC int pf_imin(int a, int b) { return a < b ? a : b; }

PF_FUNC pf_u32 pf_pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return pf_u32(__bfloat16_as_ushort(lo)) | (pf_u32(__bfloat16_as_ushort(hi)) << 16);
}
PF_FUNC pf_u32 pf_pack2(__half lo, __half hi) {
  return pf_u32(__half_as_ushort(lo)) | (pf_u32(__half_as_ushort(hi)) << 16);
}

// exact uint -> float for q < 2^23 without the (slow) I2F conversion unit
PF_FUNC float pf_u2f(pf_u32 q) { return __uint_as_float(0x4B000000u | q) - 8388608.0f; }
// two floats -> two packed T with one cvt.rn.{bf16,f16}x2.f32
PF_FUNC pf_u32 pf_pack2f(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<pf_u32*>(&v);
}
PF_FUNC pf_u32 pf_pack2f(float lo, float hi, __half) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<pf_u32*>(&v);
}

PF_FUNC void pf_mma16816(float* d, const pf_u32* a, pf_u32 b0, pf_u32 b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
PF_FUNC void pf_mma16816(float* d, const pf_u32* a, pf_u32 b0, pf_u32 b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

