// PTX wrappers shared by every kernel: element types, conversions, exp2, shared-memory
// addresses, asynchronous copies, lane reductions and float32 reductions to global memory.
//
// No CUDA headers are included: NVRTC finds none without a toolkit, so 16-bit values travel as
// raw bits (uint16_t / packed pairs in uint32_t) and every conversion is one PTX instruction.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define INFINITY __int_as_float(0x7f800000)

// log2(e) and ln(2) in float32: the kernels' softmax runs in base 2.
constexpr float LOG2E_F = 1.4426950408889634f;
constexpr float LN2_F = 0.69314718055994531f;

// Element type tags: the kernels are templated on these, not on CUDA's half types.
struct f16_t {
    static constexpr bool is_bf16 = false;
};
struct bf16_t {
    static constexpr bool is_bf16 = true;
};

template <typename T>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if constexpr (T::is_bf16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

template <typename T>
__device__ __forceinline__ float to_float(u16 x) {
    if constexpr (T::is_bf16) {
        return __uint_as_float(((u32)x) << 16);
    } else {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
}

template <typename T>
__device__ __forceinline__ u16 from_float(float f) {
    u16 r;
    if constexpr (T::is_bf16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    }
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy; src_bytes == 0 writes zeros (rows past N, columns past D).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
// An L2 policy under which lines are evicted before others: for data read once (a KV cache's
// stream), so that it does not push out what will be read again.
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
    unsigned long long policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}
// cp_async_16 under an L2 policy (l2_evict_first_policy).
__device__ __forceinline__ void cp_async_16_with_policy(u32 dst, const void* src, int src_bytes,
                                                        unsigned long long policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes), "l"(policy));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Reductions over the four lanes that share one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}


// Fire-and-forget float32 adds to global memory (the result is not needed, so RED, not ATOM).
// sm_90 adds two neighbouring floats in one instruction; p must be 8-byte aligned.
__device__ __forceinline__ void red_add_f32x2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p + 1), "f"(y) : "memory");
#endif
}

// A counter in global memory shared by thread blocks: waited on with acquire semantics (what the
// writer did before its release is visible after), and incremented with release semantics, both
// at GPU scope. The wait gives up after 2^18 polls (a quarter of a second or more), so that a
// count that never comes costs time instead of hanging the GPU; a trap there would be clearer,
// but any trap in the kernel made ptxas spill the caller's registers. Returns whether it saw the
// value (false: it gave up).
__device__ __forceinline__ bool wait_until_equal_gpu(const int* p, int value) {
    u32 seen_it;
    asm volatile(
        "{\n"
        ".reg .pred done, late;\n"
        ".reg .b32 seen, polls;\n"
        "mov.b32 polls, 0;\n"
        "WAIT:\n"
        "ld.acquire.gpu.global.b32 seen, [%1];\n"
        "setp.eq.s32 done, seen, %2;\n"
        "@done bra DONE;\n"
        "add.u32 polls, polls, 1;\n"
        "setp.eq.u32 late, polls, 262144;\n"
        "@late bra DONE;\n"
        "nanosleep.u32 32;\n"
        "bra WAIT;\n"
        "DONE:\n"
        "selp.u32 %0, 1, 0, done;\n"
        "}\n"
        : "=r"(seen_it) : "l"(p), "r"(value) : "memory");
    return seen_it != 0;
}
__device__ __forceinline__ void red_release_gpu_add(int* p, int value) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(value) : "memory");
}

// Programmatic dependent launch (compute capability 9.0). The host launches some kernels of a
// call as dependents of the kernel before them in the stream (kernels/_launch.py,
// DriverLaunch): such a kernel's blocks may start while that one still runs, so every thread of
// it waits, before it touches any memory, until the kernel before it has ended and its writes
// are visible. The kernel before lets them start early (its dependents only start once every one
// of its blocks has started, so they never take an SM from it). For a kernel launched the usual
// way both are no-ops, and on older architectures they compile to nothing (the host launches
// no dependents there).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_kernel_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// First index in [lo, hi) of the ascending array `a` whose value is >= `value` (hi if none).
__device__ __forceinline__ int lower_bound_index(const int* a, int lo, int hi, int value) {
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Dot product of two packed pairs of 16-bit values, in float32.
template <typename T>
__device__ __forceinline__ float dot2(u32 x, u32 y) {
    return to_float<T>((u16)(x & 0xffffu)) * to_float<T>((u16)(y & 0xffffu)) +
           to_float<T>((u16)(x >> 16)) * to_float<T>((u16)(y >> 16));
}

