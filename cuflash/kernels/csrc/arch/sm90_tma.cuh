// sm_90a pieces of a warp-specialised kernel: tensor-memory-accelerator (TMA) copies and bulk
// reduce-adds, the mbarriers that say when copies have landed or when a buffer may be refilled,
// and the register hand-over between producer and consumer warpgroups.
#pragma once
#include "arch/sm90_wgmma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// A CUtensorMap (128 bytes, 64-byte aligned), encoded on the host and passed by value in a
// __grid_constant__ kernel parameter, where TMA reads it.
struct __align__(64) TmaDesc {
    u64 bits[16];
};

// ---- mbarriers (shared-memory u64 words addressed by their shared-space address)

__device__ __forceinline__ void mbar_init(u32 bar, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the inits visible to the async proxy (TMA) before any copy signals them.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// The producer's arrival, announcing how many bytes the copies it issues will deliver.
__device__ __forceinline__ void mbar_arrive_expect_bytes(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Whether the barrier's phase with this parity has completed (one non-blocking test).
__device__ __forceinline__ bool mbar_test(u32 bar, u32 parity) {
    u32 done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}
// Blocks until the barrier's phase with this parity has completed. A freshly initialised
// barrier counts as having completed the phase before its first, so waiting on parity 1 passes
// at once: that is how a producer sees every buffer of a new ring as free.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    while (!mbar_test(bar, parity)) {
    }
}

// Position in a ring of STAGES buffers, with the parity of the mbarrier phase that fills (or
// frees) the current one: it flips each time the ring wraps.
template <int STAGES>
struct RingSlot {
    int stage = 0;
    u32 phase = 0;
    __device__ __forceinline__ void advance() {
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
};

// ---- persistent grids: which tile a thread block takes next

// The tiles of a launch, dealt to its thread blocks. A block starts with tile blockIdx.x. In a
// grid of one block per tile (no counter) that is its only one. In a persistent grid (fewer
// blocks, one per SM) a block's next tile is gridDim.x plus a ticket drawn from `counter`, so that
// blocks take the tiles in order as they finish, as the hardware deals the blocks of a full grid
// (a fixed deal leaves some SMs the heavy tiles of a causal call). The counter holds two ints,
// tickets drawn and blocks done, both zero when a launch starts: the last block to finish sets
// them back, for the next launch on the same stream (the host keeps one counter per stream and
// one per captured launch: _launch.TileCounters).
struct TileTickets {
    int* counter;
    int tile_count;
    __device__ __forceinline__ int first() const { return blockIdx.x; }
    __device__ __forceinline__ int next(int index) const {
        return counter == nullptr ? index + (int)gridDim.x : (int)gridDim.x + atomicAdd(counter, 1);
    }
    // Called once per block, after the draw that ran past the last tile: no block draws again
    // once every block has got here.
    __device__ __forceinline__ void finish() const {
        if (counter == nullptr) return;
        __threadfence();
        if (atomicAdd(counter + 1, 1) == (int)gridDim.x - 1) {
            counter[0] = 0;
            counter[1] = 0;
        }
    }
};

// ---- TMA

__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* desc) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(desc) : "memory");
}
// One box of a 4-D tensor (coordinates innermost first) into shared memory at `dst`, signalling
// `bar` with its byte count when it lands. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* desc, u32 bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(desc), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global `src` into shared memory
// at `dst`, signalling `bar` with the byte count when they land.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// ---- key/value ring buffers filled by TMA (the producers of the forward and the dQ kernel)

// What a load carries beside its tile: here nothing (an exact mask's record in the forward).
struct NothingBeside {
    __device__ __forceinline__ u32 post() const { return 0; }
    __device__ __forceinline__ void load(u32) const {}
};

// One K or V tile (BOXES boxes of 64 columns × BLOCK_N keys from key row `key_row`) into the ring
// buffer at `dst`, once its "empty" barrier (phase parity `phase`) says the consumers are done
// with what it held; its "full" barrier counts the bytes in, those of `beside` too.
template <int BOXES, int BLOCK_N, class Beside = NothingBeside>
__device__ __forceinline__ void load_ring_tile(u32 dst, const TmaDesc* map, u32 full, u32 empty, u32 phase,
                                               int key_row, int hk, int batch, const Beside& beside = {}) {
    mbar_wait(empty, phase ^ 1);
    mbar_arrive_expect_bytes(full, BOXES * BLOCK_N * 128 + beside.post());
#pragma unroll
    for (int box = 0; box < BOXES; ++box)
        tma_load_4d(dst + box * BLOCK_N * 128, map, full, 64 * box, key_row, hk, batch);
    beside.load(full);
}

// Zeros rows first_row .. ROWS - 1 of a landed ring tile (BOXES boxes of ROWS rows of 128 bytes,
// as load_ring_tile lays them out: the 128-byte swizzle only moves 16-byte chunks within a row, so
// a row stays its own 128 bytes in each box), shared among `threads` threads of which this is
// `thread`, and orders the zeros before later async-proxy reads (wgmma). Packed sequences' tiles
// that end past their sequence hold the next sequence's rows there, where a dense call's tiles
// hold TMA's zero fill. A barrier over the same threads then makes the zeros every thread's.
template <int BOXES, int ROWS>
__device__ __forceinline__ void zero_ring_rows(u32 tile, int first_row, int thread, int threads) {
    const int chunks = (ROWS - first_row) * 8;  // 16-byte chunks in one box's rows to clear
#pragma unroll
    for (int box = 0; box < BOXES; ++box)
        for (int i = thread; i < chunks; i += threads) {
            const u32 at = tile + box * ROWS * 128 + first_row * 128 + i * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(at), "r"(0) : "memory");
        }
    fence_proxy_async_shared();
}

// ---- bulk reductions (shared → global, by the TMA unit, asynchronous to the issuing thread)

// Adds `bytes` (a multiple of 16) of float32 at shared address `src` into global `dst`, element
// by element and atomically, as one bulk operation of this thread's current bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, u32 src, u32 bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 ::"l"(dst), "r"(src), "r"(bytes)
                 : "memory");
}
// Copies `bytes` (a multiple of 16) from shared address `src` to global `dst`, as one bulk
// operation of this thread's current bulk group.
__device__ __forceinline__ void bulk_store(void* dst, u32 src, u32 bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n"
                 ::"l"(dst), "r"(src), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until this thread's bulk operations have read their shared sources (which may then be rewritten).
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// Until this thread's bulk operations have completed.
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's completed bulk writes to global memory (async proxy) before its later
// generic accesses, such as a release that tells other blocks the writes are there.
__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// ---- warp specialisation

// 1 for one elected lane of a fully active warp, 0 for the others.
__device__ __forceinline__ bool elect_one_lane() {
    u32 elected;
    asm volatile(
        "{\n.reg .pred p;\n.reg .b32 lane;\n"
        "elect.sync lane|p, 0xffffffff;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(elected));
    return elected != 0;
}
// Hands registers between warpgroups: the producer gives most of its share back, the consumers
// take it. Every warp of the warpgroup must execute it.
template <int REGS>
__device__ __forceinline__ void release_registers() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void claim_registers() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
