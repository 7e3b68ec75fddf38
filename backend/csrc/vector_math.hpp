// Small numeric helpers shared by the library's kernels: bf16 numbers as bits, widened to and rounded from
// f32, and, where the CPU has AVX-512, 16 at a time and a vector exp.

#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gsam {

using bf16 = uint16_t;  // a bf16 number's bits

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}
inline void put(float* to, float x) { *to = x; }
// Rounded to nearest even (NaN stays a quiet NaN), as OpenVINO's f32 -> bf16 conversion rounds.
inline void put(bf16* to, float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        *to = static_cast<bf16>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *to = static_cast<bf16>(bits >> 16);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* from) { return _mm512_loadu_ps(from); }
inline __m512 load16(const bf16* from) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store16(float* to, __m512 x) { _mm512_storeu_ps(to, x); }
inline void store16(bf16* to, __m512 x) {
#if defined(__AVX512BF16__)
    const __m256bh narrow = _mm512_cvtneps_pbh(x);  // the plugin's own conversion on such CPUs
    std::memcpy(to, &narrow, 32);
#else
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, x);
    for (int i = 0; i < 16; ++i) put(to + i, lanes[i]);
#endif
}

// The first ``count`` (at most 16) lanes.
inline __mmask16 first_lanes(int64_t count) {
    return static_cast<__mmask16>(count >= 16 ? 0xffffu : (1u << count) - 1u);
}

#if defined(__AVX512BW__)
// Lanes outside ``m`` are not read and come back as ``fill``.
inline __m512 load16(const float* from, __mmask16 m, __m512 fill) { return _mm512_mask_loadu_ps(fill, m, from); }
inline __m512 load16(const bf16* from, __mmask16 m, __m512 fill) {
    const __m256i bits = _mm256_maskz_loadu_epi16(m, from);
    return _mm512_mask_mov_ps(fill, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
}
inline void store16(float* to, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(to, m, x); }
inline void store16(bf16* to, __m512 x, __mmask16 m) {
    alignas(64) bf16 lanes[16];
    store16(lanes, x);
    _mm256_mask_storeu_epi16(to, m, _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
}
#endif

inline __m512 exp512(__m512 x) {
    // exp(x) = 2^n * e^f, n = round(x / ln2), f = x - n ln2 in two parts; Cephes' polynomial for e^f on
    // [-ln2/2, ln2/2] (relative error ~2e-7). x is clamped where e^x is 0 in f32 anyway (so e^-inf is
    // ~1e-45, not 0: callers that need 0 there mask it).
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace gsam
