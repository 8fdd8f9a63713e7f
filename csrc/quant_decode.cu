// Decode attention over a request's run of quantized pages (int8/int4/int2): the CUDA twin
// of triton_kernels/quant_decode.py's _qrun_kernel -- same grid (request, KV head, split),
// same flash-decoding partials (unnormalised output, running max, sum); the last program of
// a row merges them with the forward's into the output (merge_last), so the reduction
// kernel is not launched. Page format: docs/page_format.md.
//
// Why CUDA here: Triton brings 8-bit codes to the MMA's operand layout through shared
// memory one byte at a time (LDS.U8) and converts them elementwise; its int4 page loop
// issues ~1,750 SASS instructions per page per warp (benchmarks/sass_census.py), which caps
// int4 decode at ~1.5x of bf16 pages. Here each lane loads the bytes its mma.sync fragments
// need with vector loads, and the conversion writes the fragments in place (~800
// instructions per int4 page, sass_census.py --cuda). A dot product does not care in which
// order its channels are summed, so a lane's bytes are chosen contiguous and the query's
// fragments and the output's columns follow the same channel order.
//
// Built at first use by NVRTC (torch.cuda._compile_kernel, no headers); the launcher
// (quant_decode._cuda_kernel) prepends the shape: D, BS, P (page bytes), CAP8/CAP4/CAP2,
// HAS8/HAS4/HAS2, STAGES, QBF16, MINB, PDL, CHAINS/PIPE/STEAL (A/B variants, off: measured in
// docs/kernels.md, "When each program runs"), NIDS (block ids of a
// row's first entries kept in shared memory after the ring of pages: STAGES * P + 4 NIDS bytes
// in all), TIMELINE (probe builds only).
//
// PDL (sm_90+): this kernel is launched first and lets the next one in the stream -- the
// forward, launched as its programmatic dependent -- start at once, so the forward's short
// programs (live block, full pages) run on the SM room the one wave of this kernel leaves
// instead of before it. Each of the row's programs, ours and the forward's, counts itself
// done; whichever is last merges (merge_last; the forward's copy of it in Triton).
// It may itself be launched as the dependent of the kernel before it (quant_decode.CUDA_EARLY,
// an A/B knob): then its start (the row's metadata, block ids, tags and the scan: inputs of
// the step, not of that kernel) runs while that kernel ends, and griddepcontrol.wait holds
// it before anything that kernel may write or read (the query, the partials, the counters).
//
// One warp per program. A page a step: cp.async copies the whole page (P bytes) into a
// ring of STAGES slots in shared memory (STAGES - 1 pages in flight per warp), 16-byte
// chunks permuted within their 128-byte line (Swz) so that the fragment loads hit distinct
// banks. Scores and outputs are computed transposed (S^T = K q'^T, O^T = V^T P'^T): the
// codes are the mma's A operand (16 tokens or 16 channels), the query's G <= 8 rows its 8
// columns (Run). Per page:
//   keys   S = (1024 + 2^(bits p) code) . q' + c      with q' = q KS 2^-(bits p) (per channel)
//          codes -> fp16 with one lop3 per operand pair and plane, (w & mask) | 0x6400
//          on a word w or on w >> 8 (exact): int4/int2 pages store their bytes in this
//          pair order (quant.key_byte, value_byte); int8, one prmt under 0x64 bytes;
//          c = KZ . q - 1024 sum(q'), by the same mma (an all-1024 operand), so the offset
//          cancels as the tensor core rounded it.
//   values o = o alpha - 1024 sum(P') + (1024 + 2^(bits p) code) . P',  P' = P VS (fp16),
//          transposed into the B operand by movmatrix; z = z alpha + P VZ (zero-points,
//          per token), added at the end with each plane's 2^-(bits p). The offset comes
//          off per page: kept in the accumulator across pages it costs accuracy (the
//          Triton kernel measured twice the error).

#ifndef PIPE
#define PIPE 0
#endif
#ifndef TIMELINE
#define TIMELINE 0
#endif
#ifndef STEAL
#define STEAL 0
#endif
#ifndef ZQUAD
#define ZQUAD 0
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)
#define H1024 0x64006400u   // fp16 pair (1024, 1024)
#define HM1024 0xE400E400u  // fp16 pair (-1024, -1024)

// d = A . B + C, one m16n8k16 tile (fp16 operands, fp32 accumulators)
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1, const float* c) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// an 8x8 fp16 tile in the accumulator layout, transposed into the B operand's
__device__ __forceinline__ u32 movtrans(u32 x) {
    u32 r;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
    return r;
}

__device__ __forceinline__ float h2f(u16 x) {
    float r;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(x));
    return r;
}

__device__ __forceinline__ u32 pack(float lo, float hi) {  // fp16 pair, lo in the low half
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// (x & m) | 1024.0 pairs in one LOP3 (the compiler splits two immediates into two)
__device__ __forceinline__ u32 or1024(u32 x, u32 m) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(x), "r"(m), "r"(H1024));
    return r;
}

__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float q_at(const u16* q, i64 i) {  // one query element as fp32
#if QBF16
    return __uint_as_float(((u32)q[i]) << 16);
#else
    return h2f(q[i]);
#endif
}

__device__ __forceinline__ void cp16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

#if TIMELINE
// (probe only: benchmarks/probe_timeline.py builds it with TIMELINE = the programs it holds)
// per program: %globaltimer (ns) at its start [0], after the scan [1], when its first page
// has landed [2], after its last page [3], after its partial [4], at its end [5]; its SM
// [6]; its pages [7]; clock64 at [2] and [3] ([8], [9]); its warp slot on the SM [10]; its
// split [11]; in the merge: counted [12], (the row's last only) its partials visible [13],
// the (m, l) loaded [14], the outputs summed [15].
__device__ unsigned long long kvc_tl[TIMELINE][16];
__device__ __forceinline__ void tl_set(int k, unsigned long long v) {
    const int pid = (blockIdx.x * gridDim.y + blockIdx.y) * gridDim.z + blockIdx.z;
    if (threadIdx.x == 0 && pid < TIMELINE) kvc_tl[pid][k] = v;
}
__device__ __forceinline__ void tl_mark(int k) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    tl_set(k, t);
}
__device__ __forceinline__ void tl_mark_after(int k, float dep) {  // once dep is computed
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t) : "f"(dep));
    tl_set(k, t);
}
#define TL(k) tl_mark(k)
#define TL_AFTER(k, dep) tl_mark_after(k, dep)
#define TL_SET(k, v) tl_set(k, v)
#else
#define TL(k)
#define TL_AFTER(k, dep)
#define TL_SET(k, v)
#endif

__device__ __forceinline__ int cap_of(int tag) {
    return tag == 8 ? CAP8 : tag == 4 ? CAP4 : tag == 2 ? CAP2 : BS;
}

template <int B>
struct Bits {
    static constexpr int value = B;
};

template <bool B>
struct Full {
    static constexpr bool value = B;
};

template <int BITS>
struct Fmt {
    static constexpr int NP = 8 / BITS;             // planes: channel c at byte c % ROW, bits (c / ROW) BITS
    static constexpr int ROW = D * BITS / 8;        // bytes of a code row
    static constexpr int CAP = BITS == 8 ? CAP8 : BITS == 4 ? CAP4 : CAP2;
    static constexpr int NSTEP = (CAP + 15) / 16;   // 16-token steps of a page
    static constexpr int RB = ROW / 4;              // key bytes of lane t
    static constexpr int RBV = ROW / 8;             // value bytes of lane g
    static constexpr int NR = D / 8;                // fp16 pairs of a key row per lane = value channels per lane
    static constexpr int KC = RB >= 16 ? RB / 16 : 1;   // 16-byte chunks of a lane's key bytes
    static constexpr int KB = RB >= 16 ? 16 : RB;       // bytes of one key load
    static constexpr int STEP = 16 * ROW;               // bytes of codes of a 16-token step
    // byte offsets in a page (quant.page_offsets)
    static constexpr int VQ = CAP * ROW;
    static constexpr int KS = 2 * CAP * ROW;
    static constexpr int KZ = KS + 2 * D;
    static constexpr int VS = KZ + 2 * D;
    static constexpr int VZ = VS + 2 * CAP;
    // int4/int2 pages of blocks of 16 store their bytes in pair order (quant.paired); others
    // keep the plain order, which this kernel does not read (cuda_supported: BS == 16)
    static_assert(BITS == 8 || BS == 16, "int4/int2 pages are in pair order at blocks of 16 only");
    // every slot of the 16-token steps lies inside the page (rows past CAP are read, then masked)
    static_assert(VQ + 16 * NSTEP * ROW <= P && VZ + 2 * 16 * NSTEP <= P, "a step would read past the page");
    // plane p's code bits in both halves of a pair
    static constexpr __device__ u32 mask(int p) {
        return BITS == 8 ? 0x00FF00FFu : (((1u << BITS) - 1) << (BITS * p)) * 0x10001u;
    }
};

// Shared memory order of the codes: 16-byte chunks permuted within their 128-byte line, so
// that one fragment load instruction (keys: 8 lanes, a chunk each of 2 tokens; values: the
// lanes of 4 tokens 2 rows apart) hits distinct banks -- XOR of (line & 3) << 1 for rows of
// 32 or 64 bytes, of line & 7 for rows of 128. The pattern repeats every 512 (1024) bytes,
// a multiple of a 16-token step of codes, so a lane's offsets are computed once and a step
// adds a constant. The scales (from KS on) stay in place.
template <int BITS>
struct Swz {
    using F = Fmt<BITS>;
    static constexpr int PERIOD = BITS == 8 ? 1024 : 512;
    static constexpr bool ON = (16 * F::ROW) % PERIOD == 0 && F::KS % 128 == 0;
    static __device__ __forceinline__ u32 at(u32 off) {
        if (!ON || off >= (u32)F::KS) return off;
        const u32 line = off >> 7;
        return off ^ ((BITS == 8 ? (line & 7) : ((line & 3) << 1)) << 4);
    }
};

// N bytes (2, 4, 8 or 16, inside one 16-byte chunk) at shared offset off, as 32-bit words
template <int N>
__device__ __forceinline__ void lds(const u8* pg, u32 off, u32* w) {
    if constexpr (N == 16) {
        uint4 v = *reinterpret_cast<const uint4*>(pg + off);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (N == 8) {
        uint2 v = *reinterpret_cast<const uint2*>(pg + off);
        w[0] = v.x; w[1] = v.y;
    } else if constexpr (N == 4) {
        w[0] = *reinterpret_cast<const u32*>(pg + off);
    } else {
        w[0] = *reinterpret_cast<const u16*>(pg + off);
    }
}

template <int BITS>
struct Run {
    using F = Fmt<BITS>;
    // Scores and outputs are computed transposed (S^T = K q'^T, O^T = V^T P'^T): the codes
    // are the mma's A operand, whose 4-register groups the conversion writes directly, and
    // the query's G <= 8 rows are the n = 8 columns. Lane (g, t) holds query rows 2t, 2t+1.
    float o[F::NR / 2][4];  // O^T m-tile: (channel u = 2mt, rows 2t, 2t+1), (u = 2mt + 1, rows 2t, 2t+1)
    float m[2], l[2], z[2];  // rows 2t, 2t+1: running max (log2), this lane's sum, its sum p VZ
    // (ZQUAD) c's dots take the zero-points' words as loaded, two k-tiles a quad
    static constexpr bool ZQ = ZQUAD && (F::RB / 4) % 2 == 0;
    u32 qs[F::NR];           // query row g times scale2, fp16 pairs in the key channel order (ZQ: query()'s order)
    u32 qp[F::NR];           // the same times each plane's 2^-(BITS p)
    u32 ko[2][F::KC];        // shared offsets of this lane's key bytes of tokens g, g + 8 in step 0
    u32 vo[4];               // ... of its value bytes of tokens 2t, 2t+1, 2t+8, 2t+9 (int4/int2: of pairs t, t + 4)

    // A page's scores, before the mask: s[st][e] is token 16 st + g + 8 (e >> 1), query row 2t + (e & 1).
    __device__ __forceinline__ void keys(const u8* pg, int t, float (&s)[F::NSTEP][4]) {
        // keys' per-channel scales into q (q'), and the score's part common to every token:
        // c = q . KZ - 1024 sum(q'), by mma so that it cancels the codes' offset exactly as rounded
        u32 ks[F::NR], kz[F::NR], qk[F::NR];
#pragma unroll
        for (int p = 0; p < F::NP; ++p) {
            u32 a[F::RB / 2], b[F::RB / 2];
            constexpr int N = F::RB * 2 >= 16 ? 16 : F::RB * 2;
#pragma unroll
            for (int c = 0; c < F::RB * 2 / N; ++c) {
                lds<N>(pg, F::KS + 2 * (t * F::RB + p * F::ROW) + N * c, a + N / 4 * c);
                lds<N>(pg, F::KZ + 2 * (t * F::RB + p * F::ROW) + N * c, b + N / 4 * c);
            }
#pragma unroll
            for (int w = 0; w < F::RB / 4; ++w)
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    ks[(w * F::NP + p) * 2 + s] = a[2 * w + s];
                    kz[(w * F::NP + p) * 2 + s] = b[2 * w + s];
                }
        }
#pragma unroll
        for (int i = 0; i < F::NR; ++i) qk[i] = hmul2(qp[i], ks[i]);
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        if constexpr (Run::ZQ) {
            // (A/B, quant_decode.CUDA_ZQUAD; ready, not yet run on a GPU) KZ . q from the key
            // zero-points' words as loaded: a quad (kt0 lo, kt0 hi, kt1 lo, kt1 hi) of two
            // k-tiles is the mma's A operand as it is, rows g taking the lo halves and rows
            // g + 8 the hi halves; two dots, one with the lo halves of q (qs in the ZQ order:
            // query()) whose rows g are kept, one with the hi halves whose rows g + 8 are
            // kept. The quad (kz, kz, kz', kz') of the dot below costs ~4 register copies a
            // k-tile (sass_census.py: ~45 of the int4 loop's 61 IMAD.MOV build c's operands).
            float c2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int p = 0; p < F::NP; ++p)
#pragma unroll
                for (int w = 0; w < F::RB / 4; w += 2) {
                    const int k0 = w * F::NP + p, k1 = (w + 1) * F::NP + p, jb = 4 * (p * (F::RB / 8) + w / 2);
                    mma(c, kz[2 * k0], kz[2 * k0 + 1], kz[2 * k1], kz[2 * k1 + 1], qs[jb], qs[jb + 1], c);
                    mma(c2, kz[2 * k0], kz[2 * k0 + 1], kz[2 * k1], kz[2 * k1 + 1], qs[jb + 2], qs[jb + 3], c2);
                }
#pragma unroll
            for (int kt = 0; kt < F::NR / 2; ++kt)
                mma(c, HM1024, HM1024, HM1024, HM1024, qk[2 * kt], qk[2 * kt + 1], c);  // every row: rows g count
            c[0] += c2[2];
            c[1] += c2[3];
            c[2] = c[0];
            c[3] = c[1];
        } else {
#if CHAINS
        // (A/B, quant_decode.CUDA_CHAINS) two chains of NR / 2 dots instead of one of NR, and
        // the score steps below start from zero and add c at the end: the page's dots are
        // not all queued behind c
        float c2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kt = 0; kt < F::NR / 2; ++kt) {
            mma(c, kz[2 * kt], kz[2 * kt], kz[2 * kt + 1], kz[2 * kt + 1], qs[2 * kt], qs[2 * kt + 1], c);
            mma(c2, HM1024, HM1024, HM1024, HM1024, qk[2 * kt], qk[2 * kt + 1], c2);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) c[e] += c2[e];
#else
#pragma unroll
        for (int kt = 0; kt < F::NR / 2; ++kt) {
            mma(c, kz[2 * kt], kz[2 * kt], kz[2 * kt + 1], kz[2 * kt + 1], qs[2 * kt], qs[2 * kt + 1], c);
            mma(c, HM1024, HM1024, HM1024, HM1024, qk[2 * kt], qk[2 * kt + 1], c);
        }
#endif
        }
        // scores: lane (g, t) brings tokens g and g + 8 of each 16-token step, key bytes [t RB, (t+1) RB)
#pragma unroll
        for (int st = 0; st < F::NSTEP; ++st) {
            u32 k0[F::RB / 4], k1[F::RB / 4];
#pragma unroll
            for (int ch = 0; ch < F::KC; ++ch) {
                lds<F::KB>(pg, ko[0][ch] + st * F::STEP, k0 + F::KB / 4 * ch);
                lds<F::KB>(pg, ko[1][ch] + st * F::STEP, k1 + F::KB / 4 * ch);
            }
#if CHAINS
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
#else
            float acc[4] = {c[0], c[1], c[2], c[3]};
#endif
#pragma unroll
            for (int w = 0; w < F::RB / 4; ++w) {
                if constexpr (BITS == 8) {
                    u32 x0 = __byte_perm(k0[w], 0x64646464u, 0x4140);  // bytes 0, 1 under 0x64: 1024 + byte
                    u32 x1 = __byte_perm(k0[w], 0x64646464u, 0x4342);  // bytes 2, 3
                    u32 y0 = __byte_perm(k1[w], 0x64646464u, 0x4140);
                    u32 y1 = __byte_perm(k1[w], 0x64646464u, 0x4342);
                    mma(acc, x0, y0, x1, y1, qk[2 * w], qk[2 * w + 1], acc);
                } else {
                    // the word holds the row's bytes 0, 2, 1, 3 (quant.key_byte): bytes 0, 1
                    // are its halves' low bytes, bytes 2, 3 those of the word shifted by 8;
                    // one lop3 a plane makes each fp16 pair 1024 + code 2^(BITS p)
                    const u32 x1 = k0[w] >> 8, y1 = k1[w] >> 8;
#pragma unroll
                    for (int p = 0; p < F::NP; ++p) {
                        const int kt = w * F::NP + p;
                        const u32 mk = F::mask(p);
                        mma(acc, or1024(k0[w], mk), or1024(k1[w], mk), or1024(x1, mk), or1024(y1, mk), qk[2 * kt],
                            qk[2 * kt + 1], acc);
                    }
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) s[st][e] = CHAINS ? acc[e] + c[e] : acc[e];
        }
    }

    // The page's softmax and value dots, given its scores; ntok tokens (FULL: all CAP).
    template <bool FULL>
    __device__ __forceinline__ void values(const u8* pg, float (&s)[F::NSTEP][4], int ntok, int g) {
        // online softmax over the page; a query row's tokens are spread over the lanes g
        const int lim = FULL ? F::CAP : ntok;
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int st = 0; st < F::NSTEP; ++st)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // (a full page: only its last step has rows past CAP)
                if ((!FULL || st * 16 + 16 > F::CAP) && st * 16 + g + (e >> 1) * 8 >= lim) s[st][e] = NEG_INF;
                mx[e & 1] = fmaxf(mx[e & 1], s[st][e]);
            }
        float alpha[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
            for (int d = 4; d < 32; d <<= 1) mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], d));
            float mn = fmaxf(m[e], mx[e]);
            alpha[e] = ex2(m[e] - mn);
            m[e] = mn;
            l[e] *= alpha[e];
            z[e] *= alpha[e];
        }
        // P' = P VS (per token), transposed into the value dots' B operand; the codes' offset
        // 1024 sum(P') by mma; zero-points z += P VZ
        u32 pb[F::NSTEP][2];
        float f[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int st = 0; st < F::NSTEP; ++st) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int slot = st * 16 + g + 8 * hf;
                float p0 = ex2(s[st][2 * hf] - m[0]), p1 = ex2(s[st][2 * hf + 1] - m[1]);
                // past the page's tokens p = 0, and the scales may be any bits (NaN): zeroed
                // (the slots lie inside the page: static_assert in Fmt)
                const u16 vsb = *reinterpret_cast<const u16*>(pg + F::VS + 2 * slot);
                const u16 vzb = *reinterpret_cast<const u16*>(pg + F::VZ + 2 * slot);
                const bool in = (FULL && st * 16 + 16 <= F::CAP) || slot < lim;
                const float vs = in ? h2f(vsb) : 0.f, vz = in ? h2f(vzb) : 0.f;
                l[0] += p0;
                l[1] += p1;
                z[0] = fmaf(p0, vz, z[0]);
                z[1] = fmaf(p1, vz, z[1]);
                pb[st][hf] = movtrans(pack(p0 * vs, p1 * vs));
            }
            mma(f, H1024, H1024, H1024, H1024, pb[st][0], pb[st][1], f);
        }
#pragma unroll
        for (int mt = 0; mt < F::NR / 2; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][e] = fmaf(o[mt][e], alpha[e & 1], -f[e]);
        // values: lane (g, t) brings tokens 2t, 2t+1 (a0, a1) and 2t+8, 2t+9 (a2, a3) of a step,
        // bytes [g RBV, (g+1) RBV): channel u = p RBV + byte of the lane, m-tile u / 2
        if constexpr (BITS != 8) {
            // int4/int2: a token pair's rows interleaved 2 bytes at a time (quant.value_byte),
            // so word be / 2 of the lane's 2 RBV bytes holds bytes be, be + 1 of both tokens:
            // one lop3 a plane for each operand pair, on the word and on the word shifted by 8
            constexpr int NW = F::RBV >= 2 ? F::RBV / 2 : 1;
#pragma unroll
            for (int st = 0; st < F::NSTEP; ++st) {
                u32 wa[NW], wc[NW];
                lds<2 * F::RBV>(pg, vo[0] + st * F::STEP, wa);
                lds<2 * F::RBV>(pg, vo[1] + st * F::STEP, wc);
#pragma unroll
                for (int be = 0; be < F::RBV; be += 2) {
                    const u32 xa = wa[be >> 1] >> 8, xc = wc[be >> 1] >> 8;
#pragma unroll
                    for (int p = 0; p < F::NP; ++p) {
                        const u32 mk = F::mask(p);
                        const int mt = (p * F::RBV + be) / 2;
                        mma(o[mt], or1024(wa[be >> 1], mk), or1024(xa, mk), or1024(wc[be >> 1], mk), or1024(xc, mk),
                            pb[st][0], pb[st][1], o[mt]);
                    }
                }
            }
            return;
        }
#pragma unroll
        for (int st = 0; st < F::NSTEP; ++st) {
            constexpr int NW = F::RBV >= 4 ? F::RBV / 4 : 1;
            u32 va[NW], vb[NW], vc[NW], vd[NW];
            lds<F::RBV>(pg, vo[0] + st * F::STEP, va);
            lds<F::RBV>(pg, vo[1] + st * F::STEP, vb);
            lds<F::RBV>(pg, vo[2] + st * F::STEP, vc);
            lds<F::RBV>(pg, vo[3] + st * F::STEP, vd);
#pragma unroll
            for (int p = 0; p < F::NP; ++p)
#pragma unroll
                for (int be = 0; be < F::RBV; be += 2) {
                    // bytes be, be + 1 of both tokens of a pair into the low bytes of two halves
                    const int b0 = be & 3, b1 = (be + 1) & 3;
                    const u32 s0 = b0 | (b0 << 4) | ((4 + b0) << 8) | ((4 + b0) << 12);
                    const u32 s1 = b1 | (b1 << 4) | ((4 + b1) << 8) | ((4 + b1) << 12);
                    const u32 mk = F::mask(p);
                    u32 a0 = or1024(__byte_perm(va[be >> 2], vb[be >> 2], s0), mk);
                    u32 a1 = or1024(__byte_perm(va[be >> 2], vb[be >> 2], s1), mk);
                    u32 a2 = or1024(__byte_perm(vc[be >> 2], vd[be >> 2], s0), mk);
                    u32 a3 = or1024(__byte_perm(vc[be >> 2], vd[be >> 2], s1), mk);
                    const int mt = (p * F::RBV + be) / 2;
                    mma(o[mt], a0, a1, a2, a3, pb[st][0], pb[st][1], o[mt]);
                }
        }
    }

    // (PIPE) the first page's scores, once it has landed in slot 0 (the loop then scores
    // each next page beside this one's values)
    __device__ __forceinline__ void keys_first(const u8* smem, int t, float (&s)[F::NSTEP][4]) {
        cp_wait<STAGES - 2>();
        __syncwarp();
        TL(2);
        TL_SET(8, clock64());
        keys(smem, t, s);
    }

    // One page in shared memory, ntok tokens (FULL: all CAP): its scores, then its softmax and
    // value dots (one body per FULL, as measured: the two share no code across the branch).
    template <bool FULL>
    __device__ __forceinline__ void page(const u8* pg, int ntok, int g, int t) {
        float s[F::NSTEP][4];
        keys(pg, t, s);
        values<FULL>(pg, s, ntok, g);
    }

#if STEAL
    // (A/B, quant_decode.CUDA_STEAL) The run's pages [jbase, j_end) in chunks of STEAL pages,
    // handed out by a counter per (row, KV head) (wctr: chunks taken in the low 16 bits,
    // programs done in the high): split s starts with chunks s and s + QSPLITS, and the rest
    // go to whichever program asks first. A warp that shares its SM sub-partition with an
    // older one issues less often (probe_timeline.py: programs of equal pages ended their
    // loops 110-166 us apart), so with fixed splits the call waits for the slowest; here
    // the faster ones take more. The next chunk is known (its block ids loaded) a chunk
    // ahead, and the counter asked a chunk before that, so no page waits on either.
    template <class Copy>
    __device__ __forceinline__ void steal(Copy& copy, const int* ids_s, const int* bt_row, int jbase, int j_end,
                                          int n_tok, int qsplit, int QSPLITS, int* wctr, u8* smem, int g, int t) {
        const int lane = threadIdx.x;
        const int NCH = (j_end - jbase + STEAL - 1) / STEAL;
        auto ids_of = [&](int c) {  // lane i: the block id of chunk c's page i
            const int j = jbase + c * STEAL + lane;
            return c < NCH && lane < STEAL && j < j_end ? (j < NIDS ? ids_s[j] : bt_row[j]) : 0;
        };
        int c_cur = qsplit, c_nxt = qsplit + QSPLITS, i_cur = 0, raw = 0;
        int ids_cur = ids_of(c_cur), ids_nxt = ids_of(c_nxt);
        bool pending = false;
        auto ask = [&]() {
            raw = lane == 0 ? atomicAdd(wctr, 1) : 0;  // waited on a chunk later, at its first use
            pending = true;
        };
        if (c_nxt < NCH) ask();
        auto next = [&](i64& b) -> int {  // the stream's next page (-1: none) and its block id
            if (c_cur >= NCH) return -1;
            const int j = jbase + c_cur * STEAL + i_cur;
            b = __shfl_sync(0xffffffffu, ids_cur, i_cur);
            if (++i_cur == STEAL || j + 1 == j_end) {  // the chunk is issued: on to the next
                c_cur = c_nxt;
                ids_cur = ids_nxt;
                i_cur = 0;
                c_nxt = NCH;
                if (pending) {
                    c_nxt = (__shfl_sync(0xffffffffu, raw, 0) & 0xFFFF) + 2 * QSPLITS;
                    pending = false;
                    ids_nxt = ids_of(c_nxt);
                    if (c_nxt < NCH) ask();
                }
            }
            return j;
        };
        auto issue = [&](int j, i64 b, u32 slot) {
            if (j >= 0) copy(b, slot);
            cp_commit();
        };
        int fifo[STAGES - 1];  // the pages in the ring's slots, in the order they are read
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            i64 b = 0;
            fifo[s] = next(b);
            issue(fifo[s], b, s);
        }
        u32 cur = 0;
        int npages = 0;
#if PIPE
        float s[F::NSTEP][4];
        keys_first(smem, t, s);
        while (fifo[0] >= 0) {
            i64 b = 0;
            const int jn = next(b);
            issue(jn, b, cur == 0 ? STAGES - 1 : cur - 1);
            cp_wait<STAGES - 2>();  // the next page has landed ...
            __syncwarp();           // ... in every lane
            const u32 nxt = cur == STAGES - 1 ? 0 : cur + 1;
            // the partial page (the run's last) may come anywhere in a program's stream; past
            // the stream, the next slot holds an old page whose scores are never used
            const int ntok = min(F::CAP, n_tok - (fifo[0] - jbase) * F::CAP);
            float sn[F::NSTEP][4];
            if (ntok >= F::CAP) {
                keys(smem + nxt * P, t, sn);
                values<true>(smem + cur * P, s, ntok, g);
            } else {
                keys(smem + nxt * P, t, sn);
                values<false>(smem + cur * P, s, ntok, g);
            }
#pragma unroll
            for (int st = 0; st < F::NSTEP; ++st)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[st][e] = sn[st][e];
#else
        while (fifo[0] >= 0) {
            i64 b = 0;
            const int jn = next(b);
            issue(jn, b, cur == 0 ? STAGES - 1 : cur - 1);
            cp_wait<STAGES - 1>();  // this page has landed ...
            __syncwarp();           // ... in every lane
            if (TIMELINE && npages == 0) {
                TL(2);
                TL_SET(8, clock64());
            }
            const u32 nxt = cur == STAGES - 1 ? 0 : cur + 1;
            const int ntok = min(F::CAP, n_tok - (fifo[0] - jbase) * F::CAP);
            if (ntok >= F::CAP)
                page<true>(smem + cur * P, ntok, g, t);
            else
                page<false>(smem + cur * P, ntok, g, t);
#endif
#pragma unroll
            for (int k = 0; k + 1 < STAGES - 1; ++k) fifo[k] = fifo[k + 1];
            fifo[STAGES - 2] = jn;
            ++npages;
            __syncwarp();           // every lane is done with the slot before it is refilled
            cur = nxt;
        }
        TL(3);
        TL_SET(9, clock64());
        TL_SET(7, npages);
        cp_wait<0>();
        // this program's last ask has been answered (an empty chunk): the last program of the
        // (row, KV head) to get here leaves the counter zero for the next launch
        if (lane == 0 && (atomicAdd(wctr, 0x10000) >> 16) == QSPLITS - 1) *wctr = 0;
    }
#endif

    // Pages [j_lo, j_hi) of the run that starts at entry jbase and holds n_tok tokens.
    __device__ __forceinline__ void go(const u16* q, i64 q_row, double scale2d, const u8* kvb, const int* bt_row,
                                       const int* ids_s, int stride_qh, int h, int stride_kb, int stride_kh, int j_lo,
                                       int j_hi, int jbase, int n_tok, int G, u8* smem, int j_end, int qsplit,
                                       int QSPLITS, int* wctr) {
        const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
        // the query's fragments (qs, qp), once the first pages' copies are on their way: its
        // loads' round trip then overlaps theirs (issued after them, the first page landed
        // ~1 round trip later: probe_timeline.py's first_page)
        auto query = [&]() {
            const float scale2 = (float)scale2d;
#pragma unroll
            for (int i = 0; i < F::NR; ++i) {
                const int w = i / (2 * F::NP), p = (i / 2) % F::NP, sp = i % 2;
                const int ch = t * F::RB + 4 * w + 2 * sp + p * F::ROW;
                float x0 = 0.f, x1 = 0.f;
                if (g < G) {
                    x0 = q_at(q, q_row + (i64)g * stride_qh + ch) * scale2;
                    x1 = q_at(q, q_row + (i64)g * stride_qh + ch + 1) * scale2;
                }
                const u32 qn = pack(x0, x1);
                const float ps = 1.f / (float)(1 << (BITS * p));
                qp[i] = hmul2(qn, pack(ps, ps));
                // (ZQ) the pairs of k-tiles w and w + 1 (w even) of plane p, lo halves then hi
                qs[ZQ ? 4 * (p * (F::RB / 8) + w / 2) + 2 * sp + (w & 1) : i] = qn;
            }
        };
        // rows 8 apart share the swizzle where 8 rows span whole periods
        constexpr bool EIGHT = (8 * F::ROW) % Swz<BITS>::PERIOD == 0;
#pragma unroll
        for (int c = 0; c < F::KC; ++c) {
            ko[0][c] = Swz<BITS>::at(g * F::ROW + t * F::RB + 16 * c);
            ko[1][c] = EIGHT ? ko[0][c] + 8 * F::ROW : Swz<BITS>::at((g + 8) * F::ROW + t * F::RB + 16 * c);
        }
        if constexpr (BITS == 8) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                vo[k] = Swz<BITS>::at(F::VQ + (2 * t + k) * F::ROW + g * F::RBV);
                vo[k + 2] = EIGHT ? vo[k] + 8 * F::ROW : Swz<BITS>::at(F::VQ + (2 * t + k + 8) * F::ROW + g * F::RBV);
            }
        } else {  // pairs t and t + 4 (tokens 2t, 2t+1 and 2t+8, 2t+9), the lane's 2 RBV bytes of each
            vo[0] = Swz<BITS>::at(F::VQ + t * 2 * F::ROW + g * 2 * F::RBV);
            vo[1] = EIGHT ? vo[0] + 8 * F::ROW : Swz<BITS>::at(F::VQ + (t + 4) * 2 * F::ROW + g * 2 * F::RBV);
        }
#pragma unroll
        for (int mt = 0; mt < F::NR / 2; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][e] = 0.f;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            m[e] = NEG_INF;
            l[e] = 0.f;
            z[e] = 0.f;
        }
        u32 sbase;
        asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }\n" : "=r"(sbase) : "l"(smem));
        // the lane's chunks are lane + 32 k: their shared offsets, swizzled, are the lane's
        // offset at k = 0 XOR a constant per k (Swz's pattern repeats every 4 or 8 lines)
        const u32 d0 = Swz<BITS>::at(16 * lane);
        // the pages' block ids, 32 at a time in a register per lane (one coalesced load; the
        // next 32 in flight meanwhile): a page's copy starts without waiting on a load of
        // its block id. The row's first NIDS ids are in shared memory already (the scan's).
        auto bid = [&](int j) { return j >= j_hi ? 0 : j < NIDS ? ids_s[j] : bt_row[j]; };
        int ids = bid(j_lo + lane);
        int ids_next = bid(j_lo + 32 + lane);
        auto copy = [&](i64 b, u32 slot) {  // block b's page -> a slot of the ring, 16-byte chunks
            const u8* src = kvb + (b * stride_kb + (i64)h * stride_kh) * 2 + 16 * lane;
            const u32 dst = sbase + slot * P;
#pragma unroll
            for (int k = 0; k < P / 512; ++k) {
                u32 off;
                if (512 * (k + 1) <= F::KS)  // codes: swizzled
                    off = (d0 ^ (BITS == 8 ? 64 * (k & 1) : 0)) + 512 * k;
                else if (512 * k >= F::KS)   // scales: in place
                    off = 16 * lane + 512 * k;
                else
                    off = Swz<BITS>::at(16 * lane + 512 * k);
                cp16(dst + off, src + 512 * k);
            }
        };
#if STEAL
        query();
        steal(copy, ids_s, bt_row, jbase, j_end, n_tok, qsplit, QSPLITS, wctr, smem, g, t);
        return;
#endif
        auto issue = [&](int j, u32 slot) {  // page j -> a slot of the ring
            if (j < j_hi) {
                const int i = (j - j_lo) & 31;
                if (i == 0 && j != j_lo) {
                    ids = ids_next;
                    ids_next = bid(j + 32 + lane);
                }
                copy(__shfl_sync(0xffffffffu, ids, i), slot);
            }
            cp_commit();
        };
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) issue(j_lo + s, s);
        query();
        u32 cur = 0;  // the ring slot of page j
#if PIPE
        // (A/B, quant_decode.CUDA_PIPE) the next page's key dots in the same step as this
        // page's softmax and value dots: independent work for the warp to interleave (its
        // time goes to chains of dependent instructions: docs/kernels.md). The slots hold
        // this page, the next, and STAGES - 2 in flight.
        static_assert(STAGES >= 3, "PIPE reads two pages while a third is in flight");
        float s[F::NSTEP][4];
        keys_first(smem, t, s);
        // pages before the run's last are full: only page j_hi - 1 may be partial
        for (int j = j_lo; j < j_hi - 1; ++j) {
            issue(j + STAGES - 1, cur == 0 ? STAGES - 1 : cur - 1);  // into the slot page j - 1 left
            cp_wait<STAGES - 2>();  // page j + 1 has landed (this lane's chunks) ...
            __syncwarp();           // ... and every lane's
            const u32 nxt = cur == STAGES - 1 ? 0 : cur + 1;
            float sn[F::NSTEP][4];
            keys(smem + nxt * P, t, sn);
            values<true>(smem + cur * P, s, F::CAP, g);
#pragma unroll
            for (int st = 0; st < F::NSTEP; ++st)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[st][e] = sn[st][e];
            __syncwarp();           // every lane is done with the slot before it is refilled
            cur = nxt;
        }
        const int ntok = min(F::CAP, n_tok - (j_hi - 1 - jbase) * F::CAP);
        if (ntok >= F::CAP)
            values<true>(smem + cur * P, s, ntok, g);
        else
            values<false>(smem + cur * P, s, ntok, g);
#else
        auto step = [&](int j, auto full) {  // page j, read from its slot once it has landed
            issue(j + STAGES - 1, cur == 0 ? STAGES - 1 : cur - 1);  // into the slot page j - 1 left
            cp_wait<STAGES - 1>();  // page j has landed (this lane's chunks) ...
            __syncwarp();           // ... and every lane's
            if (TIMELINE && j == j_lo) {
                TL(2);
                TL_SET(8, clock64());
            }
            page<decltype(full)::value>(smem + cur * P, min(F::CAP, n_tok - (j - jbase) * F::CAP), g, t);
            __syncwarp();           // every lane is done with the slot before it is refilled
            cur = cur == STAGES - 1 ? 0 : cur + 1;
        };
        // pages before the run's last are full: only page j_hi - 1 may be partial. (One loop
        // body, the full page's: with both bodies behind a branch, nvcc's int4 loop was 941
        // SASS instructions a page, 871 now.)
        for (int j = j_lo; j < j_hi - 1; ++j) step(j, Full<true>{});
        step(j_hi - 1, Full<false>{});  // (the masked body, full or not: one copy of each body in all)
#endif
        TL(3);
        TL_SET(9, clock64());
        TL_SET(7, j_hi - j_lo);
        cp_wait<0>();
    }

    __device__ __forceinline__ void store(float* pacc, float* pml, i64 prow0, int PSPLITS, int G) {
        const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int d = 4; d < 32; d <<= 1) {
                l[e] += __shfl_xor_sync(0xffffffffu, l[e], d);
                z[e] += __shfl_xor_sync(0xffffffffu, z[e], d);
            }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int row = 2 * t + e;
            if (row >= G) continue;
            const i64 prow = prow0 + (i64)row * PSPLITS;
#pragma unroll
            for (int mt = 0; mt < F::NR / 2; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int u = 2 * mt + r, p = u / F::RBV;
                    const float ps = 1.f / (float)(1 << (BITS * p));
                    pacc[prow * D + g * F::RBV + u % F::RBV + p * F::ROW] = o[mt][2 * r + e] * ps + z[e];
                }
            if (g == 0) {
                pml[prow * 2] = m[e];
                pml[prow * 2 + 1] = l[e];
            }
        }
    }
};

// The region's shape (paged_attention._scan_compacted): entries nc of the compacted region,
// its leading full pages nf, the largest tag, and whether it is [full pages][one precision].
// bid0: the row's first 256 block ids (entry 8 lane + u), loaded with the row's metadata.
// A lane holds 8 consecutive entries, so a chunk of 256 is one warp scan of the lanes' sums
// and one reduction per statistic. (Entries 32 u + lane took 8 scans and 8 x 4 reductions,
// ~440 SASS instructions of dependent shuffles at every program's start.)
__device__ __forceinline__ void scan(const int* bt_row, const signed char* tags, int kept, int max_blocks,
                                     const int (&bid0)[8], int& nc, int& nf, int& qbits, bool& ok) {
    const int lane = threadIdx.x;
    int upper = min((kept + BS - 1) / BS, max_blocks);
    int done = 0, first_nz = 1 << 30, last_z = -1, min_nz = 127, max_t = 0;
    nc = 0;
    // block ids, then tags, of 8 x 32 entries at once: two round trips to memory per 256 entries
    for (int c0 = 0; c0 < upper && done < kept; c0 += 256) {
        const int j0 = c0 + 8 * lane;
        int tag[8], cap[8], sum = 0;
#pragma unroll
        for (int u = 0; u < 8; ++u) tag[u] = c0 == 0 ? bid0[u] : j0 + u < upper ? bt_row[j0 + u] : 0;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            tag[u] = j0 + u < upper ? (int)tags[tag[u]] : 0;
            cap[u] = j0 + u < upper ? cap_of(tag[u]) : 0;
            sum += cap[u];
        }
        int incl = sum;  // the lanes' sums, scanned
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, d);
            if (lane >= d) incl += y;
        }
        int before = done + incl - sum, n_in = 0, fnz = 1 << 30, lz = -1, mnz = 127, mt = 0;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            // entries in the region: those that start before kept (caps > 0 past the region's end)
            const bool inreg = j0 + u < upper && before < kept;
            before += cap[u];
            n_in += inreg;
            if (inreg && tag[u] != 0) {
                fnz = min(fnz, j0 + u);
                mnz = min(mnz, tag[u]);
            }
            if (inreg && tag[u] == 0) lz = j0 + u;
            if (inreg) mt = max(mt, tag[u]);
        }
        nc += __reduce_add_sync(0xffffffffu, n_in);
        first_nz = min(first_nz, __reduce_min_sync(0xffffffffu, fnz));
        last_z = max(last_z, __reduce_max_sync(0xffffffffu, lz));
        min_nz = min(min_nz, __reduce_min_sync(0xffffffffu, mnz));
        max_t = max(max_t, __reduce_max_sync(0xffffffffu, mt));
        done += __shfl_sync(0xffffffffu, incl, 31);
    }
    nf = min(first_nz, nc);
    qbits = max_t;
    ok = last_z < first_nz && (min_nz == max_t || max_t == 0);
}


// From L2 (written by other programs; the fence before keeps them after the count). Not
// volatile asm, so that the compiler may issue them all before their first use.
__device__ __forceinline__ float ldcg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float2 ldcg2(const float* p) { return __ldcg(reinterpret_cast<const float2*>(p)); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int d = 16; d; d >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int d = 16; d; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}

// The merge's weighted sum: splits [s0, s0 + n) of each of the G heads, lane k holding split
// s0 + k's weight w[i] of head i, into acc (lane's channels 32 c + lane); U splits a step.
template <int U>
__device__ __forceinline__ void add_outputs(float (&acc)[8][D / 32], const float (&w)[8], const float* pacc,
                                            i64 prow0, int s0, int n, int PSPLITS, int G) {
    const int lane = threadIdx.x;
    // A half of the heads at a time (a warp-uniform branch), none of their loads under a
    // branch of its own: heads past G load the last head's slot and weigh 0, so a split's 16
    // loads of 4 heads go out together. With each head's loads under `if (i < G)`, each waited
    // on the head before: the call's last program spent 4.6 us summing, now 1.3 us, and int4
    // went 2.85x -> 2.90x (H200, probe_timeline.py, quant_decode_cuda.py; docs/kernels.md).
    // A branch-free sum over all 8 heads at once moved nvcc's register choices and spilled in
    // int2's page loop; this form leaves the page loops' SASS as it was.
#pragma unroll 1
    for (int h0 = 0; h0 < G; h0 += 4)
#pragma unroll U
        for (int k = 0; k < n; ++k)
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if ((i < 4) != (h0 == 0)) continue;
                const float wk = __shfl_sync(0xffffffffu, w[i], k);
                const float* pa = pacc + (prow0 + min(i, G - 1) * PSPLITS + s0 + k) * D + lane;
#pragma unroll
                for (int c = 0; c < D / 32; ++c) acc[i][c] += (i < G ? wk : 0.f) * ldcg(pa + 32 * c);
            }
}

// The last program of a (row, KV head) to finish merges the PSPLITS partials of its G query
// heads -- the forward's and every split's -- into the output (and the LSE): what
// paged_attention._reduce_kernel does, without its launch. cnt[r * H_kv + h] counts the
// programs done -- our QSPLITS, and the forward's NFWD when it runs beside us (PDL; else it
// ran before, NFWD = 0) -- and is reset by the last.
// It runs after every other program of the row, with nothing left to hide its latency, so
// its loads are issued together: lane s holds split s of every head (32 splits a round),
// the heads unrolled, 4 splits' outputs a step. (Loading head after head and split after
// split, each load waiting on the one before, cost ~0.03 ms per launch on the H100.)
__device__ __forceinline__ void merge_last(int* cnt, const float* pacc, const float* pml, u16* out, float* lse,
                                           int write_lse, int q_start, int h, int G, int H_Q, int PSPLITS,
                                           int QSPLITS, int NFWD, int stride_ot, int stride_oh) {
    const int lane = threadIdx.x;
    __threadfence();
    int last = 0;
    if (lane == 0) {
        const int k = blockIdx.x * gridDim.y + h;
        last = atomicAdd(cnt + k, 1) == QSPLITS + NFWD - 1;
        if (last) cnt[k] = 0;
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    TL(12);
    if (!last) return;
    __threadfence();
    TL(13);
    constexpr int C = D / 32;  // output channels per lane: 32 c + lane
    const i64 prow0 = ((i64)q_start * H_Q + (i64)h * G) * PSPLITS;  // head i: prow0 + i PSPLITS
    float mmax[8], ltot[8], acc[8][C];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        mmax[i] = NEG_INF;
        ltot[i] = 0.f;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[i][c] = 0.f;
    }
    if (PSPLITS <= 32) {
        // the usual case, one round: each (m, l) loaded once, so two trips to L2 in all
        // (the (m, l), then the outputs), not three
        float w[8];  // split lane's (m, l) of head i, then its weight
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 ml = i < G && lane < PSPLITS ? ldcg2(pml + (prow0 + i * PSPLITS + lane) * 2)
                                                      : make_float2(NEG_INF, 0.f);
            w[i] = ml.x;
            ltot[i] = ml.y;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            mmax[i] = i < G ? warp_max(w[i]) : 0.f;
            if (mmax[i] == NEG_INF) mmax[i] = 0.f;
            w[i] = lane < PSPLITS ? ex2(w[i] - mmax[i]) : 0.f;
            ltot[i] *= w[i];
        }
        TL_AFTER(14, w[0]);
        // (2 splits a step: 4 held more loads in flight than registers, and spilled)
        add_outputs<2>(acc, w, pacc, prow0, 0, PSPLITS, PSPLITS, G);
        TL_AFTER(15, acc[0][C - 1]);
    } else {
        // more splits than lanes: the maxima first, then weights and outputs, 32 splits a round
        for (int s0 = 0; s0 < PSPLITS; s0 += 32) {
            const bool ok = s0 + lane < PSPLITS;
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (i < G) mmax[i] = fmaxf(mmax[i], ok ? ldcg(pml + (prow0 + i * PSPLITS + s0 + lane) * 2) : NEG_INF);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            mmax[i] = warp_max(mmax[i]);
            if (mmax[i] == NEG_INF) mmax[i] = 0.f;
        }
        for (int s0 = 0; s0 < PSPLITS; s0 += 32) {
            const bool ok = s0 + lane < PSPLITS;
            float w[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                w[i] = 0.f;
                if (i < G && ok) {
                    const float* ml = pml + (prow0 + i * PSPLITS + s0 + lane) * 2;
                    w[i] = ex2(ldcg(ml) - mmax[i]);
                    ltot[i] += w[i] * ldcg(ml + 1);
                }
            }
            add_outputs<4>(acc, w, pacc, prow0, s0, min(32, PSPLITS - s0), PSPLITS, G);
        }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (i >= G) break;
        float lt = warp_sum(ltot[i]);
        if (lt == 0.f) lt = 1.f;
        const float inv = 1.f / lt;
        const i64 hq = (i64)h * G + i;
        u16* o = out + (i64)q_start * stride_ot + hq * stride_oh;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            u16 v;
#if QBF16
            asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(v) : "f"(acc[i][c] * inv));
#else
            asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(v) : "f"(acc[i][c] * inv));
#endif
            o[32 * c + lane] = v;
        }
        if (write_lse && lane == 0) lse[(i64)q_start * H_Q + hq] = mmax[i] + __log2f(lt);
    }
}

extern "C" __global__ void __launch_bounds__(32, MINB)
qrun(const u16* q, const u8* kvb, const signed char* tags, const int* bt, const int* qsl, const int* kept_p,
     float* pacc, float* pml, int* cnt, u16* out, float* lse, double scale2, int max_blocks, int stride_qt,
     int stride_qh, int stride_kb, int stride_kh, int stride_bt, int H_Q, int G, int PSPLITS, int SPLIT0, int QSPLITS,
     int stride_ot, int stride_oh, int write_lse, int NFWD) {
    extern __shared__ __align__(128) u8 smem[];
#if PDL
    // the forward may start once every program of ours has started (one wave: all resident)
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    TL(0);
    const int r = blockIdx.x, h = blockIdx.y, qsplit = blockIdx.z, lane = threadIdx.x;
    const int* bt_row = bt + (i64)r * stride_bt;
    // the row's metadata and its first NIDS block ids in one round trip to memory (the ids
    // do not depend on the rest: the row's width bounds them); the ids stay in shared
    // memory, after the page ring, for the scan and the pages' copies
    const int q_start = qsl[r], q_end = qsl[r + 1], kept = kept_p[r];
    int bid0[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) bid0[u] = 8 * lane + u < max_blocks ? bt_row[8 * lane + u] : 0;
    if (q_end == q_start) return;
    static_assert(NIDS == 8 * 32, "the scan's first step: 8 ids a lane");
    int* ids_s = reinterpret_cast<int*>(smem + STAGES * P);
#pragma unroll
    for (int u = 0; u < 8; ++u) ids_s[8 * lane + u] = bid0[u];
    int nc, nf, qbits;
    bool ok;
    scan(bt_row, tags, kept, max_blocks, bid0, nc, nf, qbits, ok);
    __syncwarp();  // ids_s written by every lane
#if PDL
    // (a no-op unless launched as a dependent: CUDA_EARLY)
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    TL(1);
#if TIMELINE
    unsigned smid, wslot;
    asm("mov.u32 %0, %%smid;\n" : "=r"(smid));
    asm volatile("mov.u32 %0, %%warpid;\n" : "=r"(wslot));
    TL_SET(6, smid);
    TL_SET(10, wslot);
    TL_SET(11, qsplit);
#endif
    const i64 q_row = (i64)q_start * stride_qt + (i64)h * G * stride_qh;
    const i64 prow0 = ((i64)q_start * H_Q + (i64)h * G) * PSPLITS + SPLIT0 + qsplit;
    int per = (nc - nf + QSPLITS - 1) / QSPLITS;
    int j_lo = nf + qsplit * per, j_hi = min(nc, j_lo + per), n_q = kept - nf * BS;
    // (STEAL: every program of the row reads the run, its pages handed out as they go)
    bool run = ok && qbits != 0 && (STEAL ? nf < nc : j_lo < j_hi);
    int* wctr = cnt + (i64)gridDim.x * gridDim.y + (i64)r * gridDim.y + h;  // (STEAL) the row's chunk counter
    // the run's pages, read at its format, into this program's partials
    auto read = [&](auto bits) {
        Run<decltype(bits)::value> R;
        R.go(q, q_row, scale2, kvb, bt_row, ids_s, stride_qh, h, stride_kb, stride_kh, j_lo, j_hi, nf, n_q, G, smem,
             nc, qsplit, QSPLITS, wctr);
        R.store(pacc, pml, prow0, PSPLITS, G);
    };
    bool done = false;
#if HAS4
    if (!done && run && qbits == 4) done = (read(Bits<4>{}), true);
#endif
#if HAS2
    if (!done && run && qbits == 2) done = (read(Bits<2>{}), true);
#endif
#if HAS8
    if (!done && run && qbits == 8) done = (read(Bits<8>{}), true);
#endif
    if (!done) {  // nothing of this row's region here: an empty partial
        for (int i = lane; i < G * D; i += 32) pacc[(prow0 + (i64)(i / D) * PSPLITS) * D + i % D] = 0.f;
        if (lane < G) {
            pml[(prow0 + (i64)lane * PSPLITS) * 2] = NEG_INF;
            pml[(prow0 + (i64)lane * PSPLITS) * 2 + 1] = 0.f;
        }
    }
    TL(4);
    merge_last(cnt, pacc, pml, out, lse, write_lse, q_start, h, G, H_Q, PSPLITS, QSPLITS, NFWD, stride_ot,
               stride_oh);
    TL(5);
}
