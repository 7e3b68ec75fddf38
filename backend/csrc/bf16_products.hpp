// The two bf16 products of backend/csrc/global_attention.cpp for one block of kRows queries and one head,
// bf16 operands in the layouts the kernel packs, f32 sums:
//   logits (kRows x N_pad) = q k^T   and   out (kRows x dv) = probs v.
// Two implementations with one interface, chosen at run time (``bf16_products``):
//   AmxProducts: AMX tiles (Sapphire Rapids and later Xeons);
//   DotProducts: AVX512-BF16's vdpbf16ps (AMD Zen 4/5 EPYCs, Cooper Lake), 16 sums of two bf16 pairs each.
// Included by global_attention.cpp (inside its anonymous namespace), after Dims and kRows.
//
// Layouts (the AMX tiles' own, which DotProducts reads as they are):
//   q: kRows rows of d_pad bf16 (zero padded), scaled;
//   k: (d_pad / 2, ks) uint32, each a channel pair (2c, 2c + 1) of one key;
//   v: (N_pad / 2, dv) uint32, each a key pair (2j, 2j + 1) of one channel;
//   probs: kRows rows of ps bf16 (zero beyond N).

#pragma once

#if defined(__AVX512BF16__)
#define GSAM_BF16 1

// 16 floats as bf16, rounded to nearest even.
inline __m256i bf16x16(__m512 x) {
    const __m256bh b = _mm512_cvtneps_pbh(x);
    __m256i out;
    std::memcpy(&out, &b, sizeof(out));
    return out;
}

// Which bf16 products the process may use, under oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA`` or
// ``DNNL_MAX_CPU_ISA``), so that OpenVINO's kernels and this one follow one setting: a cap below AMX leaves
// the dot products, one below AVX512_CORE_BF16 neither (f32). oneDNN reads it once per process; this reads
// it at each call (a getenv per block of work), which lets the tests run both products in one process.
// Mirrored by openvino_ops.bf16_products, which decides whether the node is used at all.
enum class Bf16Products { none, dot, amx };

inline Bf16Products isa_cap() {
    const char* value = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (!value || !*value) value = std::getenv("DNNL_MAX_CPU_ISA");
    if (!value || !*value) return Bf16Products::amx;
    std::string isa(value);
    for (auto& ch : isa) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    if (isa == "ALL" || isa == "DEFAULT" || isa.find("AMX") != std::string::npos) return Bf16Products::amx;
    if (isa.find("AVX512_CORE_BF16") != std::string::npos || isa.find("AVX512_CORE_FP16") != std::string::npos
        || isa.rfind("AVX10", 0) == 0)
        return Bf16Products::dot;
    return Bf16Products::none;
}

// ---- AVX512-BF16 dot products -----------------------------------------------------------------------------

inline __m512bh as_bf16(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// 8 query rows x 16 * V keys of the logits, all channel pairs summed in registers (8 * V accumulators).
template <int V>
inline void logits_rows(const uint16_t* q, int64_t qs, const uint32_t* k, int64_t ks, int64_t pairs, float* out,
                        int64_t ls) {
    __m512 acc[8][V];
    for (int r = 0; r < 8; ++r)
        for (int c = 0; c < V; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh keys[V];
        for (int c = 0; c < V; ++c) keys[c] = as_bf16(_mm512_loadu_si512(k + p * ks + 16 * c));
        for (int r = 0; r < 8; ++r) {
            uint32_t pair;
            std::memcpy(&pair, q + r * qs + 2 * p, sizeof(pair));
            const __m512bh query = as_bf16(_mm512_set1_epi32(static_cast<int>(pair)));
            for (int c = 0; c < V; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], query, keys[c]);
        }
    }
    for (int r = 0; r < 8; ++r)
        for (int c = 0; c < V; ++c) _mm512_storeu_ps(out + r * ls + 16 * c, acc[r][c]);
}

// 4 query rows x 16 * C channels of the output, over the key pairs [k0, k1), added onto ``out`` unless ``first``.
template <int C>
inline void value_rows(const uint16_t* probs, int64_t ps, const uint32_t* v, int64_t dv, int64_t k0, int64_t k1,
                       float* out, bool first) {
    __m512 acc[4][C];
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + r * dv + 16 * c);
    for (int64_t p = k0; p < k1; ++p) {
        __m512bh values[C];
        for (int c = 0; c < C; ++c) values[c] = as_bf16(_mm512_loadu_si512(v + p * dv + 16 * c));
        for (int r = 0; r < 4; ++r) {
            uint32_t pair;
            std::memcpy(&pair, probs + r * ps + 2 * p, sizeof(pair));
            const __m512bh weight = as_bf16(_mm512_set1_epi32(static_cast<int>(pair)));
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], weight, values[c]);
        }
    }
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * dv + 16 * c, acc[r][c]);
}

struct DotProducts {
    static constexpr int64_t kValuePairs = 64;  // key pairs per pass of the second product: 16 KB of v stay in L1

    void begin() {}
    void end() {}

    void logits(const Dims& s, const uint16_t* q, const uint32_t* k, int64_t ks, float* out, int64_t ls) const {
        const int64_t pairs = (s.d + 1) / 2;  // the zero padding past d adds nothing
        int64_t j0 = 0;
        // 48 keys at a time (24 accumulators), a key's pairs read once per 8 rows; k's 48 columns stay in L1
        // over the block's 4 row groups.
        for (; j0 + 48 <= s.n_pad; j0 += 48)
            for (int64_t r0 = 0; r0 < kRows; r0 += 8)
                logits_rows<3>(q + r0 * s.d_pad, s.d_pad, k + j0, ks, pairs, out + r0 * ls + j0, ls);
        for (; j0 < s.n_pad; j0 += 16)  // N_pad is a multiple of 32: 0, 16 or 32 keys left
            for (int64_t r0 = 0; r0 < kRows; r0 += 8)
                logits_rows<1>(q + r0 * s.d_pad, s.d_pad, k + j0, ks, pairs, out + r0 * ls + j0, ls);
    }

    void values(const Dims& s, const uint16_t* probs, int64_t ps, const uint16_t* v16, float* out) const {
        const auto* v = reinterpret_cast<const uint32_t*>(v16);
        const int64_t pairs = s.n_pad / 2;
        for (int64_t k0 = 0; k0 < pairs; k0 += kValuePairs) {
            const int64_t k1 = std::min(pairs, k0 + kValuePairs);
            for (int64_t r0 = 0; r0 < kRows; r0 += 4)
                for (int64_t c0 = 0; c0 < s.dv; c0 += 64) {
                    const uint16_t* p = probs + r0 * ps;
                    float* o = out + r0 * s.dv + c0;
                    switch (std::min<int64_t>(4, (s.dv - c0) / 16)) {
                        case 4: value_rows<4>(p, ps, v + c0, s.dv, k0, k1, o, k0 == 0); break;
                        case 3: value_rows<3>(p, ps, v + c0, s.dv, k0, k1, o, k0 == 0); break;
                        case 2: value_rows<2>(p, ps, v + c0, s.dv, k0, k1, o, k0 == 0); break;
                        default: value_rows<1>(p, ps, v + c0, s.dv, k0, k1, o, k0 == 0); break;
                    }
                }
        }
    }
};
#endif

// ---- AMX tiles --------------------------------------------------------------------------------------------

#ifdef GSAM_AMX
constexpr int kXfeatureTileData = 18;
constexpr int kArchReqXcompPerm = 0x1023;

bool amx_permitted() {
    // Linux hands out AMX's tile state only to a process that asks (OpenVINO's CPU plugin asks too).
    static const bool permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) == 0;
    return permitted;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

struct AmxProducts {
    void begin() {
        TileConfig config;
        for (int t = 0; t < 8; ++t) {
            config.colsb[t] = 64;  // 16 f32 or 32 bf16
            config.rows[t] = 16;
        }
        _tile_loadconfig(&config);
    }

    void end() { _tile_release(); }

    // 32 keys at a time: tiles 0-3 the sums, 4-5 q, 6-7 k.
    void logits(const Dims& s, const uint16_t* q, const uint32_t* k, int64_t ks, float* out, int64_t ls) const {
        const int64_t pairs_d = s.d_pad / 2;
        for (int64_t j0 = 0; j0 < s.n_pad; j0 += 32) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t p0 = 0; p0 < pairs_d; p0 += 16) {
                _tile_loadd(4, q + 2 * p0, s.d_pad * 2);
                _tile_loadd(5, q + 16 * s.d_pad + 2 * p0, s.d_pad * 2);
                _tile_loadd(6, k + p0 * ks + j0, ks * 4);
                _tile_loadd(7, k + p0 * ks + j0 + 16, ks * 4);
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
            float* at = out + j0;
            _tile_stored(0, at, ls * 4);
            _tile_stored(1, at + 16, ls * 4);
            _tile_stored(2, at + 16 * ls, ls * 4);
            _tile_stored(3, at + 16 * ls + 16, ls * 4);
        }
    }

    // 32 columns at a time: tiles 0-3 the sums, 4-5 probs, 6-7 v.
    void values(const Dims& s, const uint16_t* probs, int64_t ps, const uint16_t* v, float* out) const {
        const int64_t pairs_n = s.n_pad / 2;
        for (int64_t c0 = 0; c0 < s.dv; c0 += 32) {
            const bool pair = c0 + 16 < s.dv;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t k0 = 0; k0 < pairs_n; k0 += 16) {
                _tile_loadd(4, probs + 2 * k0, ps * 2);
                _tile_loadd(5, probs + 16 * ps + 2 * k0, ps * 2);
                _tile_loadd(6, v + (k0 * s.dv + c0) * 2, s.dv * 4);
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
                if (pair) {
                    _tile_loadd(7, v + (k0 * s.dv + c0 + 16) * 2, s.dv * 4);
                    _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, out + c0, s.dv * 4);
            _tile_stored(2, out + 16 * s.dv + c0, s.dv * 4);
            if (pair) {
                _tile_stored(1, out + c0 + 16, s.dv * 4);
                _tile_stored(3, out + 16 * s.dv + c0 + 16, s.dv * 4);
            }
        }
    }
};
#endif
