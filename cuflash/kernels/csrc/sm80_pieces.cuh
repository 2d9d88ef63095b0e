// Warp-level pieces of the mma.sync kernels (flash_fwd.cu, flash_bwd.cu): the GEMM loop over
// ldmatrix operands, the sources of its A fragments, and 16-bit tiles exchanged through shared
// memory.
//
// Everything is __forceinline__ and sized by template parameters, so a kernel still compiles to
// one straight-line body: the loops unroll and every fragment stays in registers.
#pragma once
#include "args.cuh"
#include "arch/sm80_mma.cuh"

template <int MT, int NJ>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NJ][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NJ; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
}

// ---- A operands. A source fills the MT A fragments (16 rows each) of k16 step kk: a(frag, kk).

// From shared memory in [row][k] storage of row stride STRIDE; `addr` is the lane address (bytes,
// ldsm_a_offset included) of slab 0, slab mt lies 16·mt rows further.
template <int STRIDE>
struct SmemA {
    u32 addr;
    template <int MT>
    __device__ __forceinline__ void operator()(u32 (&a)[MT][4], int kk) const {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], addr + (mt * 16 * STRIDE + kk * 16) * 2);
    }
};

// Every fragment of such an operand, read once (to keep in registers).
template <int STRIDE, int MT, int K>
__device__ __forceinline__ void load_a_frags(u32 (&f)[MT][K][4], u32 addr) {
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
        u32 a[MT][4];
        SmemA<STRIDE>{addr}(a, kk);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 4; ++r) f[mt][kk][r] = a[mt][r];
    }
}

// The same operand kept in registers (IN_REGS: `regs`, filled once by load_a_frags) or read from
// shared memory at every use.
template <bool IN_REGS, int STRIDE, int RM, int RK>
struct CachedA {
    const u32 (&regs)[RM][RK][4];
    u32 addr;
    template <int MT>
    __device__ __forceinline__ void operator()(u32 (&a)[MT][4], int kk) const {
        if constexpr (IN_REGS) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 4; ++r) a[mt][r] = regs[mt][kk][r];
        } else {
            SmemA<STRIDE>{addr}(a, kk);
        }
    }
};
template <bool IN_REGS, int STRIDE, int RM, int RK>
__device__ __forceinline__ CachedA<IN_REGS, STRIDE, RM, RK> cached_a(const u32 (&regs)[RM][RK][4], u32 addr) {
    return {regs, addr};
}

// From float accumulators (MT slabs × NJ n8 blocks) in 16-bit: blocks 2kk and 2kk + 1 of the
// accumulator layout are exactly the A fragment of k16 step kk. MARKED: the accumulators are P
// with dropped elements marked by their sign (dropout.cuh), and P ∘ Z is packed.
template <bool MARKED>
__device__ __forceinline__ float operand_value(float x) {
    if constexpr (MARKED) return dropped_prob(x);
    return x;
}
template <typename T, int MT, int NJ, bool MARKED = false>
struct PackedA {
    const float (&acc)[MT][NJ][4];
    __device__ __forceinline__ u32 pair(int mt, int j, int i) const {
        return pack2<T>(operand_value<MARKED>(acc[mt][j][i]), operand_value<MARKED>(acc[mt][j][i + 1]));
    }
    __device__ __forceinline__ void operator()(u32 (&a)[MT][4], int kk) const {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pair(mt, 2 * kk, 0);
            a[mt][1] = pair(mt, 2 * kk, 2);
            a[mt][2] = pair(mt, 2 * kk + 1, 0);
            a[mt][3] = pair(mt, 2 * kk + 1, 2);
        }
    }
};
template <typename T, bool MARKED = false, int MT, int NJ>
__device__ __forceinline__ PackedA<T, MT, NJ, MARKED> packed_a(const float (&acc)[MT][NJ][4]) {
    return {acc};
}

// ---- The GEMM loop.

// acc (MT slabs × NJ n8 blocks) += A · B over KSTEPS k16 steps. B comes from shared memory, two n8
// blocks per ldmatrix.x4 (TRANS_B: .trans, for [k][n] storage; else [n][k]) at lane address
// b_addr(kk, j / 2) bytes, each load feeding all MT slabs. The address is a function so that a
// tile with swizzled rows (the decode's ring, flash_decode.cu) shares this loop.
template <typename T, bool TRANS_B, int KSTEPS, int MT, int NJ, class A, class BAddr>
__device__ __forceinline__ void warp_gemm(float (&acc)[MT][NJ][4], const A& a, const BAddr& b_addr) {
    static_assert(NJ % 2 == 0, "n8 blocks come in pairs");
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        u32 af[MT][4];
        a(af, kk);
#pragma unroll
        for (int j = 0; j < NJ; j += 2) {
            u32 bf[4];
            if constexpr (TRANS_B) {
                ldmatrix_x4_trans(bf, b_addr(kk, j / 2));
            } else {
                ldmatrix_x4(bf, b_addr(kk, j / 2));
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][j], af[mt], bf[0], bf[1]);
                mma_16816<T>(acc[mt][j + 1], af[mt], bf[2], bf[3]);
            }
        }
    }
}

// The same with B in a padded tile: lane address b + kk·b_kstep + (j / 2)·b_jstep bytes.
template <typename T, bool TRANS_B, int KSTEPS, int MT, int NJ, class A>
__device__ __forceinline__ void warp_gemm(float (&acc)[MT][NJ][4], const A& a, u32 b, int b_kstep, int b_jstep) {
    warp_gemm<T, TRANS_B, KSTEPS>(acc, a, [=](int kk, int pair) { return b + kk * b_kstep + pair * b_jstep; });
}

// One thread's share of an accumulator tile as 16-bit pairs into a padded shared tile of row
// stride STRIDE; `base` is this thread's element (row g, column 2t) of slab 0, block 0. MARKED as
// for PackedA.
template <typename T, int STRIDE, bool MARKED = false, int MT, int NJ>
__device__ __forceinline__ void store_pairs_smem(u16* base, const float (&acc)[MT][NJ][4]) {
    const PackedA<T, MT, NJ, MARKED> packed{acc};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            u16* row = base + mt * 16 * STRIDE + j * 8;
            *reinterpret_cast<u32*>(row) = packed.pair(mt, j, 0);
            *reinterpret_cast<u32*>(row + 8 * STRIDE) = packed.pair(mt, j, 2);
        }
}
