// The softmax rows of backend/csrc/global_attention.cpp: one query's logits for all keys, the decomposed
// relative-position terms added, exponentiated and reduced, in AVX-512 where the CPU has it (a scalar
// fallback elsewhere). Included by global_attention.cpp (inside its anonymous namespace).

#pragma once

// One query's logits row (key j = key row * W + key column) with the relative-position terms added, then
// softmaxed without the division: the row holds exp(x - max) and the return is 1 / sum.
#if defined(__AVX512F__)
// exp512, first_lanes: vector_math.hpp

float exp_row(float* row, const float* rel_h, const float* rel_w, int64_t grid_h, int64_t grid_w) {
    const int64_t n = grid_h * grid_w;
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t kh = 0; kh < grid_h; ++kh) {  // the terms added, and the maximum, in one pass
        const __m512 term = _mm512_set1_ps(rel_h[kh]);
        float* part = row + kh * grid_w;
        for (int64_t kw = 0; kw < grid_w; kw += 16) {
            const __mmask16 m = first_lanes(grid_w - kw);
            const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, part + kw),
                                           _mm512_add_ps(term, _mm512_maskz_loadu_ps(m, rel_w + kw)));
            _mm512_mask_storeu_ps(part + kw, m, x);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
        }
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = first_lanes(n - j);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), top));
        _mm512_mask_storeu_ps(row + j, m, e);
        vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    return 1.f / _mm512_reduce_add_ps(vsum);
}

// The row's probabilities p = e * inv into the key sums (received += weight p; mean += p / heads) and, for
// the AMX product, as bf16 (``probs``), in one pass.
void spread_row(const float* e, float inv, int64_t n, float weight, float* received, float* mean, float per_head,
                uint16_t* probs) {
    const __m512 to_received = _mm512_set1_ps(weight * inv), to_mean = _mm512_set1_ps(per_head * inv);
    const __m512 to_probs = _mm512_set1_ps(inv);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = first_lanes(n - j);
        const __m512 x = _mm512_maskz_loadu_ps(m, e + j);
        if (weight != 0.f)
            _mm512_mask_storeu_ps(received + j, m, _mm512_fmadd_ps(x, to_received, _mm512_maskz_loadu_ps(m, received + j)));
        if (mean) _mm512_mask_storeu_ps(mean + j, m, _mm512_fmadd_ps(x, to_mean, _mm512_maskz_loadu_ps(m, mean + j)));
#if defined(__AVX512BF16__)
        if (probs) {
            const __m256bh pb = _mm512_cvtneps_pbh(_mm512_mul_ps(x, to_probs));
            _mm256_mask_storeu_epi16(probs + j, m, reinterpret_cast<const __m256i&>(pb));
        }
#endif
    }
}
#else
float exp_row(float* row, const float* rel_h, const float* rel_w, int64_t grid_h, int64_t grid_w) {
    const int64_t n = grid_h * grid_w;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t kh = 0; kh < grid_h; ++kh)
        for (int64_t kw = 0; kw < grid_w; ++kw) {
            float& x = row[kh * grid_w + kw];
            x += rel_h[kh] + rel_w[kw];
            top = std::max(top, x);
        }
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
        row[j] = std::exp(row[j] - top);
        sum += row[j];
    }
    return 1.f / sum;
}

void spread_row(const float* e, float inv, int64_t n, float weight, float* received, float* mean, float per_head,
                uint16_t* /*probs: AMX builds only*/) {
    for (int64_t j = 0; j < n; ++j) {
        if (weight != 0.f) received[j] += weight * inv * e[j];
        if (mean) mean[j] += per_head * inv * e[j];
    }
}
#endif
