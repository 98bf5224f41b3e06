// Host C++ stand-in for the subset of the Metal Shading Language that the
// fused MoE kernels use, so `g++ -fsyntax-only` can check the Metal emission
// on machines without Apple's compiler (tests/test_kernels.py).
//
// It erases the address spaces (device/constant/threadgroup/thread) and
// declares only Metal functions and types with their real signatures. It
// CANNOT catch: address-space mismatches (e.g. a constant pointer passed
// where a device one is expected), MSL-only language rules (Metal is C++14
// based: no recursion, no function pointers, restricted C++17), attribute
// errors ([[buffer(n)]], [[kernel]] are ignored here), Metal stdlib overloads
// we did not declare, precision of metal::precise vs fast math, simdgroup
// semantics, or anything about code generation. Only a real Metal compile
// (MLX on a Mac) can.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define kernel
#define device
#define constant
#define threadgroup
#define thread

typedef unsigned int uint;
typedef unsigned short ushort;
struct uint3 {
  uint x, y, z;
};
struct alignas(16) uint4 {
  uint x, y, z, w;
};
typedef _Float16 half;
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  explicit bfloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef half float16_t;
typedef bfloat bfloat16_t;

template <typename T, typename U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

template <typename T>
T simd_shuffle_xor(T data, ushort mask);

namespace metal {
namespace precise {
float exp(float);
float tanh(float);
} // namespace precise
} // namespace metal
