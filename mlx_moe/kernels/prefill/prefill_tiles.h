// mlx-moe grouped prefill: tile constants shared by every platform header and
// by the single-source body (prefill_body.inc). Pure #defines, no code.
//
// A block (threadgroup) owns one (expert, m-tile, n-tile): PF_BM rows of one
// expert's segment of the expert-sorted (token, expert) pairs x PF_BN output
// columns, looping over K in steps of PF_BK. 4 warps / simdgroups of 32.

#define PF_THREADS 128
#define PF_BM 64           // rows (pairs) per block
#define PF_BN 128          // B-tile rows per block (gated: 64 gate + 64 up)
#ifndef PF_BK
#define PF_BK 32           // K step (32 or 64; the emitter may define 64 first)
#endif
#define PF_LDS (PF_BK + 8) // smem row stride of A/B tiles, in elements (16B-aligned rows, no bank conflicts for mma fragments)
#define PF_LDC (PF_BN + 4) // smem row stride of the float C tile
#define PF_SMEM_AB_BYTES ((PF_BM + PF_BN) * PF_LDS * 2)
#define PF_SMEM_C_BYTES (PF_BM * PF_LDC * 4)
#define PF_SMEM_FLOATS ((PF_SMEM_C_BYTES > PF_SMEM_AB_BYTES ? PF_SMEM_C_BYTES : PF_SMEM_AB_BYTES) / 4)

// helper launches
#define PF_PLAN_THREADS 256     // plan: one block computes segs / tiles
#define PF_COMBINE_THREADS 256  // combine: one thread per (token, column)
