// mlx-moe grouped prefill: the warp tile on m16n8k16 MMA fragments (PTX
// mma.sync layouts). Used by prefill_cuda.cuh (pf_mma16816 = the tensor-core
// instruction) and by the CPU emulator's "mma16816" mode (pf_mma16816 =
// a warp-collective emulation), so the fragment indexing is tested offline.

// One warp's share of the block's C tile: rows [wr, wr+32) x columns
// {h*64 + wc + [0, 32) : h = 0, 1} of C = A[BM x BK] * B[BN x BK]^T
// (A and B both K-contiguous in smem with row stride PF_LDS).
template <typename T>
struct PfWarpTile {
  float c[2][2][4][4];  // [half][m16 block][n8 block][fragment]

  PF_FUNC void zero() {
    PF_UNROLL for (int h = 0; h < 2; h++) {
      PF_UNROLL for (int i = 0; i < 2; i++) {
        PF_UNROLL for (int j = 0; j < 4; j++) {
          PF_UNROLL for (int v = 0; v < 4; v++) {
            c[h][i][j][v] = 0.0f;
          }
        }
      }
    }
  }

  PF_FUNC void mma(const T* As, const T* Bs, int wr, int wc, int lane) {
    const pf_u32* A32 = reinterpret_cast<const pf_u32*>(As);
    const pf_u32* B32 = reinterpret_cast<const pf_u32*>(Bs);
    const int g = lane >> 2, t = lane & 3;
    constexpr int L = PF_LDS / 2;  // row stride in 32-bit words
    PF_UNROLL for (int kk = 0; kk < PF_BK / 2; kk += 8) {  // kk in words: 16 elements
      pf_u32 a[2][4];
      PF_UNROLL for (int i = 0; i < 2; i++) {
        const int base = (wr + i * 16 + g) * L + kk + t;
        a[i][0] = A32[base];
        a[i][1] = A32[base + 8 * L];
        a[i][2] = A32[base + 4];
        a[i][3] = A32[base + 8 * L + 4];
      }
      PF_UNROLL for (int h = 0; h < 2; h++) {
        PF_UNROLL for (int j = 0; j < 4; j++) {
          const int bb = (h * 64 + wc + j * 8 + g) * L + kk + t;
          const pf_u32 b0 = B32[bb], b1 = B32[bb + 4];
          PF_UNROLL for (int i = 0; i < 2; i++) {
            pf_mma16816(c[h][i][j], a[i], b0, b1, T());
          }
        }
      }
    }
  }

  PF_FUNC void store(float* Cs, int wr, int wc, int lane) {
    const int g = lane >> 2, t = lane & 3;
    PF_UNROLL for (int h = 0; h < 2; h++) {
      PF_UNROLL for (int i = 0; i < 2; i++) {
        PF_UNROLL for (int j = 0; j < 4; j++) {
          const int r = wr + i * 16 + g, col = h * 64 + wc + j * 8 + 2 * t;
          Cs[r * PF_LDC + col] = c[h][i][j][0];
          Cs[r * PF_LDC + col + 1] = c[h][i][j][1];
          Cs[(r + 8) * PF_LDC + col] = c[h][i][j][2];
          Cs[(r + 8) * PF_LDC + col + 1] = c[h][i][j][3];
        }
      }
    }
  }
};
