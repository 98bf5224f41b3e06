// mlx-moe fused decode kernels: helpers shared by every backend.
//
// Written once against a handful of names that each backend header defines
// (metal_header.h, cuda_header.cuh, host_header.h):
//   DEVFN            inline device function qualifier
//   CONSTFN          constexpr function usable in device code
//   GPTR(T)          read-only pointer to global (device) memory
//   UNROLL           full-unroll pragma for the loop that follows
//   moe_u32, moe_u4  32-bit word, 16-byte vector with .x .y .z .w
//   moe_bits_to_float(u32)       reinterpret bits as float
//   moe_half_bits_to_float(u32)  low 16 bits as an IEEE half, widened
//   moe_f32(v)       any scalar (float, half, bfloat16, uint8, int) -> float
//   moe_sg_sum<N>(v) sum over aligned groups of N lanes of a 32-wide simdgroup/warp
//   MOE_EXP, MOE_TANH, MOE_ERF   float math
// and the kernel bodies (moe_gate_up.inc, moe_down.inc) see LANE, WARP,
// BID_X, BID_Y from the backend prologue (see sources.py).
//
// Nothing here may depend on the backend: no address-space keywords, no
// intrinsics; pointers are only passed as GPTR(moe_u4).

#ifndef MOE_COMMON_H
#define MOE_COMMON_H

// Weight kinds (template WK)
#define MOE_WK_AFFINE 0 // MLX affine: w = scale * q + bias per group, q packed in uint32
#define MOE_WK_MXFP4 1  // MLX mxfp4: e2m1 codes packed in uint32, e8m0 uint8 scales, group 32
#define MOE_WK_F32 2    // float weights
#define MOE_WK_F16 3
#define MOE_WK_BF16 4

// Activation vector kinds (template XK)
#define MOE_XK_F32 0
#define MOE_XK_F16 1
#define MOE_XK_BF16 2

// Activations (template ACT), same names as mlx_moe/activations.py
#define MOE_ACT_SILU 0
#define MOE_ACT_GELU_TANH 1
#define MOE_ACT_GELU 2
#define MOE_ACT_RELU 3
#define MOE_ACT_SWIGLU_OAI 4

// 16-byte words one lane reads per row and step ("chunk").
template <int WK>
CONSTFN int moe_chunk_words() {
  return WK == MOE_WK_F32 ? 2 : 1;
}

// Weight values in one chunk.
template <int WK, int BITS>
CONSTFN int moe_chunk_values() {
  return (WK == MOE_WK_AFFINE || WK == MOE_WK_MXFP4) ? 128 / BITS : 8;
}

template <int N>
struct moe_fvec {
  float v[N];
};

template <int NW>
struct moe_wvec {
  moe_u32 w[4 * NW];
};

// The chunk of N activation values starting at value c * N of the vector that
// starts at 16-byte word `base` of p. The vector's element type is XK.
template <int XK, int N>
DEVFN moe_fvec<N> moe_load_x(GPTR(moe_u4) p, int base, int c) {
  moe_fvec<N> r;
  if (XK == MOE_XK_F32) {
    UNROLL for (int i = 0; i < N / 4; ++i) {
      moe_u4 q = p[base + c * (N / 4) + i];
      r.v[4 * i + 0] = moe_bits_to_float(q.x);
      r.v[4 * i + 1] = moe_bits_to_float(q.y);
      r.v[4 * i + 2] = moe_bits_to_float(q.z);
      r.v[4 * i + 3] = moe_bits_to_float(q.w);
    }
  } else {
    UNROLL for (int i = 0; i < N / 8; ++i) {
      moe_u4 q = p[base + c * (N / 8) + i];
      moe_u32 wd[4] = {q.x, q.y, q.z, q.w};
      UNROLL for (int j = 0; j < 4; ++j) {
        if (XK == MOE_XK_BF16) {
          r.v[8 * i + 2 * j] = moe_bits_to_float(wd[j] << 16);
          r.v[8 * i + 2 * j + 1] = moe_bits_to_float(wd[j] & 0xffff0000u);
        } else {
          r.v[8 * i + 2 * j] = moe_half_bits_to_float(wd[j] & 0xffffu);
          r.v[8 * i + 2 * j + 1] = moe_half_bits_to_float(wd[j] >> 16);
        }
      }
    }
  }
  return r;
}

template <int N>
DEVFN float moe_vsum(moe_fvec<N> a) {
  float s = 0.0f;
  UNROLL for (int i = 0; i < N; ++i) {
    s += a.v[i];
  }
  return s;
}

// Chunk `idx` (in chunks, not words) of a row-major packed weight matrix.
template <int NW>
DEVFN moe_wvec<NW> moe_load_w(GPTR(moe_u4) p, unsigned long idx) {
  moe_wvec<NW> r;
  UNROLL for (int i = 0; i < NW; ++i) {
    moe_u4 q = p[idx * NW + i];
    r.w[4 * i + 0] = q.x;
    r.w[4 * i + 1] = q.y;
    r.w[4 * i + 2] = q.z;
    r.w[4 * i + 3] = q.w;
  }
  return r;
}

// fp4 e2m1 code (low 4 bits) to float: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and signs.
DEVFN float moe_e2m1(moe_u32 q) {
  moe_u32 em = q & 7u;
  // For em >= 2 the bits e1 e0 m line up with a float of exponent 126 + e.
  float mag = moe_bits_to_float((em << 22) + (126u << 23));
  mag = em >= 2u ? mag : (em == 1u ? 0.5f : 0.0f);
  return (q & 8u) ? -mag : mag;
}

// e8m0 scale (given as its integer value 0..255) to float: 2^(s - 127).
DEVFN float moe_e8m0(float s) {
  moe_u32 b = moe_u32(s);
  return b == 0u ? moe_bits_to_float(0x00400000u) : moe_bits_to_float(b << 23);
}

// Affine codes are read without shifting where possible: masking code j of a
// word in place gives q_j * 2^(BITS * j), exact through the 2^23 magic as long
// as it stays below 2^23 (codes 0..4 of 4-bit words, 0..1 of 8-bit words); the
// rest are shifted down once per word. The activations are prescaled by the
// matching 2^-(BITS * j) once per chunk (moe_prescale) and shared by all rows.
template <int BITS>
CONSTFN int moe_inplace_codes() {
  return BITS == 4 ? 5 : 2;
}

template <int BITS>
CONSTFN int moe_code_shift(int j) {
  return j < moe_inplace_codes<BITS>() ? j : j - moe_inplace_codes<BITS>();
}

template <int WK, int BITS, int N>
DEVFN moe_fvec<N> moe_prescale(moe_fvec<N> x) {
  if (WK == MOE_WK_AFFINE) {
    constexpr int PER = 32 / BITS;
    UNROLL for (int k = 0; k < N; ++k) {
      const int sh = BITS * moe_code_shift<BITS>(k % PER);
      x.v[k] *= moe_bits_to_float(moe_u32(127 - sh) << 23);
    }
  }
  return x;
}

// sum_j x_j * v_j over one chunk, where v_j is the raw quantized code (affine,
// with x from moe_prescale), the e2m1 value (mxfp4) or the float weight.
template <int WK, int BITS, int NW, int N>
DEVFN float moe_dot_chunk(moe_wvec<NW> w, moe_fvec<N> x) {
  float acc = 0.0f;
  if (WK == MOE_WK_AFFINE) {
    constexpr int PER = 32 / BITS;
    constexpr int SPLIT = moe_inplace_codes<BITS>();
    constexpr moe_u32 MASK = (1u << BITS) - 1u;
    UNROLL for (int i = 0; i < 4 * NW; ++i) {
      const moe_u32 lo = w.w[i];
      const moe_u32 hi = w.w[i] >> (BITS * SPLIT);
      UNROLL for (int j = 0; j < PER; ++j) {
        const moe_u32 src = j < SPLIT ? lo : hi;
        const moe_u32 q = src & (MASK << (BITS * moe_code_shift<BITS>(j)));
        acc += x.v[i * PER + j] * (moe_bits_to_float(q | 0x4B000000u) - 8388608.0f);
      }
    }
  } else if (WK == MOE_WK_MXFP4) {
    UNROLL for (int i = 0; i < 4 * NW; ++i) {
      UNROLL for (int j = 0; j < 8; ++j) {
        acc += x.v[i * 8 + j] * moe_e2m1((w.w[i] >> (4 * j)) & 15u);
      }
    }
  } else if (WK == MOE_WK_F32) {
    UNROLL for (int i = 0; i < 4 * NW; ++i) {
      acc += x.v[i] * moe_bits_to_float(w.w[i]);
    }
  } else {
    UNROLL for (int i = 0; i < 4 * NW; ++i) {
      float lo, hi;
      if (WK == MOE_WK_BF16) {
        lo = moe_bits_to_float(w.w[i] << 16);
        hi = moe_bits_to_float(w.w[i] & 0xffff0000u);
      } else {
        lo = moe_half_bits_to_float(w.w[i] & 0xffffu);
        hi = moe_half_bits_to_float(w.w[i] >> 16);
      }
      acc += x.v[2 * i] * lo;
      acc += x.v[2 * i + 1] * hi;
    }
  }
  return acc;
}

// One chunk's contribution to a row dot product, from the code dot product
// `dq`, the chunk's activation sum `sx` and the group's raw scale / bias.
template <int WK>
DEVFN float moe_chunk_contrib(float dq, float sx, float scale, float bias) {
  if (WK == MOE_WK_AFFINE) {
    return scale * dq + bias * sx;
  } else if (WK == MOE_WK_MXFP4) {
    return moe_e8m0(scale) * dq;
  } else {
    return dq;
  }
}

// Float erf, |error| < 2e-7 (Numerical Recipes' erfc Chebyshev fit); used
// where the backend has no erf (Metal).
DEVFN float moe_erf_approx(float x) {
  float z = x < 0.0f ? -x : x;
  float t = 1.0f / (1.0f + 0.5f * z);
  float r = t *
      MOE_EXP(-z * z - 1.26551223f +
              t * (1.00002368f +
                   t * (0.37409196f +
                        t * (0.09678418f +
                             t * (-0.18628806f +
                                  t * (0.27886807f +
                                       t * (-1.13520398f +
                                            t * (1.48851587f +
                                                 t * (-0.82215223f +
                                                      t * 0.17087277f)))))))));
  return x >= 0.0f ? 1.0f - r : r - 1.0f;
}

// act(gate, up) in float; matches mlx_moe/activations.py.
template <int ACT>
DEVFN float moe_act(float g, float u) {
  if (ACT == MOE_ACT_SILU) {
    return g / (1.0f + MOE_EXP(-g)) * u;
  } else if (ACT == MOE_ACT_GELU_TANH) {
    float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + MOE_TANH(inner)) * u;
  } else if (ACT == MOE_ACT_GELU) {
    return g * (1.0f + MOE_ERF(g * 0.7071067811865476f)) * 0.5f * u;
  } else if (ACT == MOE_ACT_RELU) {
    return (g > 0.0f ? g : 0.0f) * u;
  } else {
    // gpt-oss clamped SwiGLU: alpha 1.702, limit 7
    g = g < 7.0f ? g : 7.0f;
    u = u < -7.0f ? -7.0f : (u > 7.0f ? 7.0f : u);
    return (u + 1.0f) * (g / (1.0f + MOE_EXP(-1.702f * g)));
  }
}

#endif // MOE_COMMON_H
