// mlx-moe router kernel: the block-level names it needs beyond the fused
// kernels' headers (metal_header.h / cuda_header.cuh / host_header.h, which
// define MOE_METAL / MOE_CUDA / MOE_HOST) and moe_common.h:
//   RT_SHARED          storage class of a threadgroup (block-shared) array
//   RT_BARRIER()       threadgroup barrier over threadgroup memory
//   rt_shfl_xor(v, o)  lane LANE ^ o's float v (a full 32-lane simdgroup/warp)
#ifndef MOE_ROUTER_SYNC_H
#define MOE_ROUTER_SYNC_H

#if defined(MOE_METAL)
#define RT_SHARED threadgroup
#define RT_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
DEVFN float rt_shfl_xor(float v, int o) {
  return simd_shuffle_xor(v, ushort(o));
}
#elif defined(MOE_CUDA)
#define RT_SHARED __shared__
#define RT_BARRIER() __syncthreads()
DEVFN float rt_shfl_xor(float v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}
#else
// Host emulation: blocks run one at a time, so a function-local static is
// block-shared; a shuffle is a publish / block barrier / read through the
// same alternating slot buffers as moe_sg_sum.
#define RT_SHARED static
#define RT_BARRIER() moe_emu::barrier()
inline float rt_shfl_xor(float v, int o) {
  const int tid = moe_emu::cur->tid;
  float* slots = moe_emu::slots[moe_emu::cur->calls++ & 1];
  slots[tid] = v;
  moe_emu::barrier();
  return slots[tid ^ o];
}
#endif

#endif // MOE_ROUTER_SYNC_H
