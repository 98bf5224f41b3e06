// mlx-moe grouped prefill: Metal platform helpers for prefill_body.inc
// (emitted through mx.fast.metal_kernel). The warp tile uses simdgroup_matrix
// 8x8 float fragments (loaded element-wise from threadgroup memory with the
// fragment coordinates MLX's steel GEMM uses), so T may be half or bfloat.
// NOT YET RUN ON A MAC: written against the Metal spec and MLX's steel
// kernels only; the backend keeps it off unless MLX_MOE_PREFILL_METAL=1.
#include <metal_simdgroup_matrix>
#include <metal_stdlib>
using namespace metal;

#define PF_FUNC inline
#define PF_GLOBAL device
#define PF_SMEM threadgroup
#define PF_SHARED threadgroup
#define PF_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define PF_UNROLL _Pragma("clang loop unroll(full)")

typedef uint pf_u32;
typedef uint4 pf_u4;

PF_FUNC pf_u4 pf_u4_zero() { return uint4(0u); }
PF_FUNC float pf_exp(float x) { return metal::exp(x); }
PF_FUNC float pf_tanh(float x) { return metal::precise::tanh(x); }
PF_FUNC float pf_min(float a, float b) { return metal::min(a, b); }
PF_FUNC float pf_max(float a, float b) { return metal::max(a, b); }
PF_FUNC int pf_imin(int a, int b) { return a < b ? a : b; }

template <typename T>
PF_FUNC pf_u32 pf_pack2(T lo, T hi) {
  return pf_u32(as_type<ushort>(lo)) | (pf_u32(as_type<ushort>(hi)) << 16);
}

PF_FUNC float pf_u2f(pf_u32 q) { return float(q); }
template <typename T>
PF_FUNC pf_u32 pf_pack2f(float lo, float hi, T) {
  return pf_pack2(T(lo), T(hi));
}

template <typename T>
struct PfWarpTile {
  simdgroup_matrix<float, 8, 8> c[2][4][4];  // [half][m8 block][n8 block]

  PF_FUNC void zero() {
    PF_UNROLL for (int h = 0; h < 2; h++) {
      PF_UNROLL for (int i = 0; i < 4; i++) {
        PF_UNROLL for (int j = 0; j < 4; j++) {
          c[h][i][j] = simdgroup_matrix<float, 8, 8>(0.0f);
        }
      }
    }
  }

  PF_FUNC void mma(threadgroup const T* As, threadgroup const T* Bs, int wr, int wc, int lane) {
    const short qid = lane / 4;
    const short fm = (qid & 4) + ((lane / 2) % 4);  // fragment row of this lane
    const short fn = (qid & 2) * 2 + (lane % 2) * 2;  // fragment columns fn, fn+1
    PF_UNROLL for (int kk = 0; kk < PF_BK; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[4];
      simdgroup_matrix<float, 8, 8> b[2][4];
      PF_UNROLL for (int i = 0; i < 4; i++) {
        threadgroup const T* p = As + (wr + i * 8 + fm) * PF_LDS + kk + fn;
        a[i].thread_elements()[0] = float(p[0]);
        a[i].thread_elements()[1] = float(p[1]);
      }
      PF_UNROLL for (int h = 0; h < 2; h++) {
        PF_UNROLL for (int j = 0; j < 4; j++) {
          // B fragment (k x n): element (k = fm, n = fn + v) = Bs[n][k]
          threadgroup const T* p = Bs + (h * 64 + wc + j * 8 + fn) * PF_LDS + kk + fm;
          b[h][j].thread_elements()[0] = float(p[0]);
          b[h][j].thread_elements()[1] = float(p[PF_LDS]);
        }
      }
      PF_UNROLL for (int h = 0; h < 2; h++) {
        PF_UNROLL for (int i = 0; i < 4; i++) {
          PF_UNROLL for (int j = 0; j < 4; j++) {
            simdgroup_multiply_accumulate(c[h][i][j], a[i], b[h][j], c[h][i][j]);
          }
        }
      }
    }
  }

  PF_FUNC void store(threadgroup float* Cs, int wr, int wc, int lane) {
    const short qid = lane / 4;
    const short fm = (qid & 4) + ((lane / 2) % 4);
    const short fn = (qid & 2) * 2 + (lane % 2) * 2;
    PF_UNROLL for (int h = 0; h < 2; h++) {
      PF_UNROLL for (int i = 0; i < 4; i++) {
        PF_UNROLL for (int j = 0; j < 4; j++) {
          threadgroup float* p = Cs + (wr + i * 8 + fm) * PF_LDC + h * 64 + wc + j * 8 + fn;
          p[0] = c[h][i][j].thread_elements()[0];
          p[1] = c[h][i][j].thread_elements()[1];
        }
      }
    }
  }
};
