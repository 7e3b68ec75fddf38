// The two softmaxes of Grounding DINO's fusion layers (groundingdino's BiMultiHeadAttention) as one OpenVINO
// operation for the CPU plugin, from the (image token, head x text token) logits that
// backend/fusion_attention.py computes: the text's attention over the image (a softmax down each column,
// over the image tokens) and the image's attention over the text (a softmax along each head's text tokens).
//
// groundingdino shifts the logits by their global maximum, clamps them to +-50000, shifts each column by
// its maximum and clamps again before the column softmax, and masks padding with -inf; in the CPU plugin
// that is two ReduceMaxes, two Subtracts, an Add, a strided Softmax and a Softmax over 27-wide rows, each a
// pass over the (I, heads * T) tensor (~11 ms per layer at 800 px in bf16). Here: one pass for the maxima,
// one for the column sums, one writing both outputs. The maxima of the shifted, clamped logits are the
// shifted, clamped maxima (both are monotone), so nothing of the logits' size is written in between.
//
// Inputs:
//   0 logits (I, heads * T), f32 or bf16: image tokens' logits against each head's text tokens, head-major
//   1 image_padding (I,) boolean: True on padding tokens
//   2 text_padding (T,) boolean: True on padding tokens
// Attributes: heads; stable (groundingdino's stable_softmax_2d: shift by the global maximum); clamp_min,
// clamp_max (its clamp_min_for_underflow, clamp_max_for_overflow: +-50000).
// Outputs, of the logits' type: 0 to_text (I, heads * T): softmax over the image tokens of each column
// (0 on padding tokens); 1 to_image (I, heads * T): softmax over each head's T text tokens (0 on padding).
// All arithmetic in f32; bf16 outputs rounded to nearest even.

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "op_types.hpp"
#include "vector_math.hpp"

namespace gsam {

class FusionSoftmax : public ov::op::Op {
public:
    OPENVINO_OP("FusionSoftmax", "gsam_opset");

    FusionSoftmax() = default;
    FusionSoftmax(const ov::OutputVector& args, int64_t heads, bool stable, bool clamp_min, bool clamp_max)
        : Op(args), m_heads(heads), m_stable(stable), m_clamp_min(clamp_min), m_clamp_max(clamp_max) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 3, "expects 3 inputs, got ", get_input_size());
        NODE_VALIDATION_CHECK(this, m_heads > 0, "heads must be positive");
        const auto type = get_input_element_type(0);
        NODE_VALIDATION_CHECK(this, f32_or_bf16(type) || type.is_dynamic(),
                              "logits must be f32 or bf16, got ", type);
        const auto& logits = get_input_partial_shape(0);
        NODE_VALIDATION_CHECK(this, logits.rank().is_dynamic() || logits.rank().get_length() == 2,
                              "logits must be rank 2");
        set_output_type(0, type, logits);
        set_output_type(1, type, logits);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<FusionSoftmax>(args, m_heads, m_stable, m_clamp_min, m_clamp_max);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("heads", m_heads);
        visitor.on_attribute("stable", m_stable);
        visitor.on_attribute("clamp_min", m_clamp_min);
        visitor.on_attribute("clamp_max", m_clamp_max);
        return true;
    }

    bool has_evaluate() const override { return f32_or_bf16(get_input_element_type(0)); }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    int64_t m_heads = 0;
    bool m_stable = true;
    bool m_clamp_min = true;
    bool m_clamp_max = true;
};

namespace {

constexpr int64_t kRowBlock = 256;  // image tokens per task
constexpr float kInf = std::numeric_limits<float>::infinity();

// What groundingdino's module does to the logits before its softmaxes (attributes of the node).
struct Settings {
    bool stable;  // shift by the global maximum
    float low, high;  // the clamps: -inf / +inf where one is off
};

// groundingdino's shift and clamps of one logit: (x - global max), then clamp(min=-50000), clamp(max=50000).
struct Shift {
    float global;  // subtracted (0 without the stable shift)
    float low, high;

    float operator()(float x) const { return std::min(std::max(x - global, low), high); }
    float clamp(float x) const { return std::min(std::max(x, low), high); }
#if defined(__AVX512F__)
    __m512 operator()(__m512 x) const { return clamp(_mm512_sub_ps(x, _mm512_set1_ps(global))); }
    __m512 clamp(__m512 x) const {
        return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(low)), _mm512_set1_ps(high));
    }
#endif
};

struct Problem {
    int64_t rows, heads, tokens, width;  // width = heads * tokens
    const uint8_t* image_padding;  // rows
    const uint8_t* text_padding;  // tokens
};

// Pass 1: the global maximum, each column's maximum, and each column's maximum over unpadded rows.
template <typename T>
void maxima(const T* logits, const Problem& p, float& global, std::vector<float>& column,
            std::vector<float>& column_kept) {
    const int64_t blocks = (p.rows + kRowBlock - 1) / kRowBlock;
    std::vector<float> all(blocks * p.width, -kInf), kept(blocks * p.width, -kInf);
    tbb::parallel_for(int64_t(0), blocks, [&](int64_t block) {
        float* a = all.data() + block * p.width;
        float* k = kept.data() + block * p.width;
        for (int64_t i = block * kRowBlock; i < std::min(p.rows, (block + 1) * kRowBlock); ++i) {
            const T* row = logits + i * p.width;
            const bool pad = p.image_padding[i] != 0;
            int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            for (; c < p.width; c += 16) {
                const __mmask16 m = first_lanes(p.width - c);
                const __m512 x = load16(row + c, m, _mm512_set1_ps(-kInf));
                _mm512_mask_storeu_ps(a + c, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, a + c), x));
                if (!pad) _mm512_mask_storeu_ps(k + c, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, k + c), x));
            }
#endif
            for (; c < p.width; ++c) {
                const float x = widen(row[c]);
                a[c] = std::max(a[c], x);
                if (!pad) k[c] = std::max(k[c], x);
            }
        }
    });
    column.assign(p.width, -kInf);
    column_kept.assign(p.width, -kInf);
    for (int64_t block = 0; block < blocks; ++block)
        for (int64_t c = 0; c < p.width; ++c) {
            column[c] = std::max(column[c], all[block * p.width + c]);
            column_kept[c] = std::max(column_kept[c], kept[block * p.width + c]);
        }
    global = *std::max_element(column.begin(), column.end());
}

// The column softmax's argument for one logit: clamp(shift(x) - column max of the shifted logits), less its
// maximum over unpadded rows (``top``), as torch's softmax subtracts it.
struct ColumnTerms {
    std::vector<float> column_max;  // max_i shift(x[i, c]) = shift(max_i x[i, c])
    std::vector<float> top;  // max over unpadded i of clamp(shift(x[i, c]) - column_max[c])

    // exp of the column softmax's argument for the shifted logit ``x`` of column c (vector: columns c.., lanes m)
    float exp_at(const Shift& s, float x, int64_t c) const { return std::exp(s.clamp(x - column_max[c]) - top[c]); }
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512 exp_at(const Shift& s, __m512 x, int64_t c, __mmask16 m) const {
        const __m512 t = s.clamp(_mm512_sub_ps(x, _mm512_maskz_loadu_ps(m, column_max.data() + c)));
        return exp512(_mm512_sub_ps(t, _mm512_maskz_loadu_ps(m, top.data() + c)));
    }
#endif
};

template <typename T>
void softmaxes(const T* logits, const Problem& p, const Settings& settings, T* to_text, T* to_image) {
    float global = 0.f;
    std::vector<float> column, column_kept;
    maxima(logits, p, global, column, column_kept);
    const Shift s{settings.stable ? global : 0.f, settings.low, settings.high};
    ColumnTerms terms{std::vector<float>(p.width), std::vector<float>(p.width)};
    for (int64_t c = 0; c < p.width; ++c) {
        terms.column_max[c] = s(column[c]);
        terms.top[c] = s.clamp(s(column_kept[c]) - terms.column_max[c]);
    }
    // Pass 2: each column's sum of exp over unpadded rows.
    const int64_t blocks = (p.rows + kRowBlock - 1) / kRowBlock;
    std::vector<float> partial(blocks * p.width, 0.f);
    tbb::parallel_for(int64_t(0), blocks, [&](int64_t block) {
        float* sums = partial.data() + block * p.width;
        for (int64_t i = block * kRowBlock; i < std::min(p.rows, (block + 1) * kRowBlock); ++i) {
            if (p.image_padding[i]) continue;
            const T* row = logits + i * p.width;
            int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            for (; c < p.width; c += 16) {
                const __mmask16 m = first_lanes(p.width - c);
                const __m512 e = terms.exp_at(s, s(load16(row + c, m, _mm512_setzero_ps())), c, m);
                _mm512_mask_storeu_ps(sums + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sums + c), e));
            }
#endif
            for (; c < p.width; ++c) sums[c] += terms.exp_at(s, s(widen(row[c])), c);
        }
    });
    std::vector<float> inverse(p.width, 0.f);
    for (int64_t c = 0; c < p.width; ++c) {
        float sum = 0.f;
        for (int64_t block = 0; block < blocks; ++block) sum += partial[block * p.width + c];
        inverse[c] = 1.f / sum;
    }
    // Pass 3: both outputs, row by row.
    std::vector<float> text_bias(p.tokens);
    for (int64_t t = 0; t < p.tokens; ++t) text_bias[t] = p.text_padding[t] ? -kInf : 0.f;
    tbb::parallel_for(int64_t(0), blocks, [&](int64_t block) {
        std::vector<float> shifted(p.width);
        for (int64_t i = block * kRowBlock; i < std::min(p.rows, (block + 1) * kRowBlock); ++i) {
            const T* row = logits + i * p.width;
            T* text_row = to_text + i * p.width;
            T* image_row = to_image + i * p.width;
            const bool pad = p.image_padding[i] != 0;
            int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            for (; c < p.width; c += 16) {
                const __mmask16 m = first_lanes(p.width - c);
                const __m512 x = s(load16(row + c, m, _mm512_setzero_ps()));
                _mm512_mask_storeu_ps(shifted.data() + c, m, x);
                const __m512 e = pad ? _mm512_setzero_ps()
                                     : _mm512_mul_ps(terms.exp_at(s, x, c, m),
                                                     _mm512_maskz_loadu_ps(m, inverse.data() + c));
                store16(text_row + c, e, m);
            }
#endif
            for (; c < p.width; ++c) {
                shifted[c] = s(widen(row[c]));
                put(text_row + c, pad ? 0.f : terms.exp_at(s, shifted[c], c) * inverse[c]);
            }
            for (int64_t h = 0; h < p.heads; ++h) {  // softmax over the head's text tokens
                float* x = shifted.data() + h * p.tokens;
                T* out = image_row + h * p.tokens;
#if defined(__AVX512F__) && defined(__AVX512BW__)
                __m512 vtop = _mm512_set1_ps(-kInf);
                for (int64_t t = 0; t < p.tokens; t += 16) {
                    const __mmask16 m = first_lanes(p.tokens - t);
                    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + t),
                                                   _mm512_maskz_loadu_ps(m, text_bias.data() + t));
                    _mm512_mask_storeu_ps(x + t, m, v);
                    vtop = _mm512_mask_max_ps(vtop, m, vtop, v);
                }
                const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(vtop));
                __m512 vsum = _mm512_setzero_ps();
                for (int64_t t = 0; t < p.tokens; t += 16) {
                    // padding (-inf) gets exactly 0, as torch's softmax gives it (exp512 would give ~1e-45)
                    const __mmask16 m = first_lanes(p.tokens - t);
                    const __m512 v = _mm512_maskz_loadu_ps(m, x + t);
                    const __mmask16 kept = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-kInf), _CMP_NEQ_OQ) & m;
                    const __m512 e = _mm512_maskz_mov_ps(kept, exp512(_mm512_sub_ps(v, top)));
                    _mm512_mask_storeu_ps(x + t, m, e);
                    vsum = _mm512_add_ps(vsum, e);
                }
                const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
                for (int64_t t = 0; t < p.tokens; t += 16) {
                    const __mmask16 m = first_lanes(p.tokens - t);
                    store16(out + t, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + t), inv), m);
                }
#else
                float top = -kInf;
                for (int64_t t = 0; t < p.tokens; ++t) {
                    x[t] += text_bias[t];
                    top = std::max(top, x[t]);
                }
                float sum = 0.f;
                for (int64_t t = 0; t < p.tokens; ++t) {
                    x[t] = std::exp(x[t] - top);
                    sum += x[t];
                }
                const float inv = 1.f / sum;
                for (int64_t t = 0; t < p.tokens; ++t) put(out + t, x[t] * inv);
#endif
            }
        }
    });
}

}  // namespace

bool FusionSoftmax::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Shape& logits = inputs[0].get_shape();
    const ov::Shape& image_padding = inputs[1].get_shape();
    const ov::Shape& text_padding = inputs[2].get_shape();
    OPENVINO_ASSERT(logits.size() == 2 && image_padding.size() == 1 && text_padding.size() == 1,
                    "FusionSoftmax: logits must be (I, heads * T), the paddings (I,) and (T,)");
    OPENVINO_ASSERT(byte_mask(inputs[1].get_element_type()) && byte_mask(inputs[2].get_element_type()),
                    "FusionSoftmax: the paddings must be boolean");
    const int64_t rows = static_cast<int64_t>(logits[0]), width = static_cast<int64_t>(logits[1]);
    const int64_t tokens = static_cast<int64_t>(text_padding[0]);
    OPENVINO_ASSERT(static_cast<int64_t>(image_padding[0]) == rows, "FusionSoftmax: image_padding has ",
                    image_padding[0], " tokens, the logits ", rows);
    OPENVINO_ASSERT(tokens > 0 && width == m_heads * tokens, "FusionSoftmax: logits are ", width,
                    " wide, not heads (", m_heads, ") x text tokens (", tokens, ")");
    OPENVINO_ASSERT(rows > 0, "FusionSoftmax: no image tokens");
    const Problem p{rows, m_heads, tokens, width, static_cast<const uint8_t*>(inputs[1].data()),
                    static_cast<const uint8_t*>(inputs[2].data())};
    const Settings settings{m_stable, m_clamp_min ? -50000.f : -kInf, m_clamp_max ? 50000.f : kInf};
    for (auto& output : outputs) output.set_shape(logits);
    const auto type = inputs[0].get_element_type();
    if (type == ov::element::bf16) {
        softmaxes(static_cast<const bf16*>(inputs[0].data()), p, settings, static_cast<bf16*>(outputs[0].data()),
                  static_cast<bf16*>(outputs[1].data()));
    } else {
        OPENVINO_ASSERT(type == ov::element::f32, "FusionSoftmax: logits must be f32 or bf16, got ", type);
        softmaxes(static_cast<const float*>(inputs[0].data()), p, settings, static_cast<float*>(outputs[0].data()),
                  static_cast<float*>(outputs[1].data()));
    }
    return true;
}

}  // namespace gsam
