// Grounding DINO's multi-scale deformable attention as one OpenVINO operation for the CPU plugin.
//
// groundingdino's PyTorch path (and the grid_sample form backend/dino_fast.py exports without this
// library) samples every (query, head, level, point) into a tensor of (heads, C, points, queries) per
// level, then weights and sums it: on OpenVINO that is GridSample in f32, a Reorder back to bf16, a
// Multiply, a ReduceSum and the Transposes around them, ~18 M samples per level and layer at 800 px.
// Here each output vector is accumulated in registers from its 4 x levels x points bilinear corners,
// and nothing of the sampled size is ever written. Same products as grid_sample (align_corners=False,
// zeros padding) up to float summation order; built and loaded by backend/openvino_ops.py.
//
// Inputs:
//   0 value (bs, keys, heads * C): the projected value tokens, levels one after another, row-major
//   1 spatial_shapes (levels, 2) i64 or i32: each level's (h, w); the sum of h * w must equal keys
//   2 reference_points (bs, queries, levels, 2) points (x, y) or (bs, queries, levels, 4) boxes (cx, cy, w, h)
//   3 offsets (bs, queries, heads * levels * points * 2): the sampling_offsets projection, (x, y) last
//   4 weights (bs, queries, heads * levels * points): the attention weights, or with ``softmax`` their logits
//   5 padding (bs, keys) boolean: True on padding tokens, whose values are read as zeros (groundingdino
//     zeroes them before sampling)
// Attributes: heads, points, softmax (the weights are logits: each (query, head)'s levels x points are
// softmaxed here, in registers, instead of by a Softmax node, a pass over the weights).
// Output: (bs, queries, heads * C), of the value's type.
// Value, offsets and weights are all f32 or all bf16, reference_points either. bf16 is for graphs compiled
// at bf16 (openvino_ops.OpsLibrary.narrow_io): the CPU plugin computes these inputs in bf16 and
// would otherwise convert each to f32 and the output back, a pass over each (~50 ms of the text half at
// 800 px); the sums are f32 either way, and the output is rounded to nearest even as the plugin's own
// conversion rounds it.

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "op_types.hpp"
#include "vector_math.hpp"

namespace gsam {

class DeformableAttention : public ov::op::Op {
public:
    OPENVINO_OP("DeformableAttention", "gsam_opset");

    DeformableAttention() = default;
    DeformableAttention(const ov::OutputVector& args, int64_t heads, int64_t points, bool softmax)
        : Op(args), m_heads(heads), m_points(points), m_softmax(softmax) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 6, "expects 6 inputs, got ", get_input_size());
        const auto type = get_input_element_type(0);
        NODE_VALIDATION_CHECK(this, f32_or_bf16(type) || type.is_dynamic(),
                              "value must be f32 or bf16, got ", type);
        NODE_VALIDATION_CHECK(this, get_input_element_type(3) == type && get_input_element_type(4) == type,
                              "offsets and weights must be of the value's type ", type);
        NODE_VALIDATION_CHECK(this, m_heads > 0 && m_points > 0, "heads and points must be positive");
        const auto& value = get_input_partial_shape(0);
        const auto& weights = get_input_partial_shape(4);
        ov::PartialShape out = ov::PartialShape::dynamic(3);
        if (value.rank().is_static() && weights.rank().is_static()) {
            NODE_VALIDATION_CHECK(this, value.rank().get_length() == 3 && weights.rank().get_length() == 3,
                                  "value and weights must be rank 3");
            out = ov::PartialShape{value[0], weights[1], value[2]};
        }
        set_output_type(0, get_input_element_type(0), out);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<DeformableAttention>(args, m_heads, m_points, m_softmax);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("heads", m_heads);
        visitor.on_attribute("points", m_points);
        visitor.on_attribute("softmax", m_softmax);
        return true;
    }

    bool has_evaluate() const override { return f32_or_bf16(get_input_element_type(0)); }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    int64_t m_heads = 0;
    int64_t m_points = 0;
    bool m_softmax = false;
};

namespace {

constexpr int64_t kMaxChannels = 1024;  // per head, for the generic (unfixed) channel count
alignas(64) constexpr float kZeros[32] = {};  // where the vector path's corners outside the map read (any type: 0 bits)

#if defined(__AVX512F__)
// The positions, corner weights and corner indices of one (query, head)'s 16 samples (levels x points == 16)
// in AVX-512 lanes, sample i in lane i; corners outside the map (and samples wholly outside, or at a NaN
// position) get weight 0 and the index ``outside``, which the caller reads as zeros (``kZeros``): added
// without a branch, they add nothing whatever the map holds. The arithmetic is the scalar loop's, lane by
// lane (the per-sample positions and corners were most of the kernel's time: 25 -> 14 ms per encoder layer
// at 800 px in the scratch harness).
struct Lanes {
    __m512 width, height, points;
    __m512i start, w_int, h_int, ref_x, ref_y, ref_w, ref_h;
    __m512i outside;  // the index given to corners outside the map: the key count, read as zeros
    __mmask16 ref_floats;  // a query's reference points: levels x (2 or 4) floats
};

template <typename T>
inline void corners16(const Lanes& c, const float* ref, int64_t ref_dim, const T* off, __m512 a,
                      float* weights, int32_t* index) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 o0 = load16(off), o1 = load16(off + 16);
    const __m512 ox = _mm512_permutex2var_ps(o0, even, o1), oy = _mm512_permutex2var_ps(o0, odd, o1);
    const __m512 r = _mm512_maskz_loadu_ps(c.ref_floats, ref);
    const __m512 rx = _mm512_permutexvar_ps(c.ref_x, r), ry = _mm512_permutexvar_ps(c.ref_y, r);
    const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    __m512 lx, ly;
    if (ref_dim == 2) {
        lx = _mm512_add_ps(rx, _mm512_div_ps(ox, c.width));
        ly = _mm512_add_ps(ry, _mm512_div_ps(oy, c.height));
    } else {
        const __m512 rw = _mm512_permutexvar_ps(c.ref_w, r), rh = _mm512_permutexvar_ps(c.ref_h, r);
        lx = _mm512_add_ps(rx, _mm512_mul_ps(_mm512_mul_ps(_mm512_div_ps(ox, c.points), rw), half));
        ly = _mm512_add_ps(ry, _mm512_mul_ps(_mm512_mul_ps(_mm512_div_ps(oy, c.points), rh), half));
    }
    // pixel = ((2 * location - 1 + 1) * size - 1) / 2, in the scalar loop's order of operations
    const auto pixel = [&](__m512 location, __m512 size) {
        const __m512 grid = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(2.f), location), one);
        return _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(grid, one), size), one), half);
    };
    const __m512 x = pixel(lx, c.width), y = pixel(ly, c.height);
    const __m512 minus_one = _mm512_set1_ps(-1.f);
    const __mmask16 inside = _mm512_cmp_ps_mask(x, minus_one, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, c.width, _CMP_LT_OQ)
                             & _mm512_cmp_ps_mask(y, minus_one, _CMP_GT_OQ) & _mm512_cmp_ps_mask(y, c.height, _CMP_LT_OQ);
    const __m512 x0f = _mm512_maskz_roundscale_ps(inside, x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 y0f = _mm512_maskz_roundscale_ps(inside, y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 fx = _mm512_sub_ps(x, x0f), fy = _mm512_sub_ps(y, y0f);
    const __m512 gx = _mm512_sub_ps(one, fx), gy = _mm512_sub_ps(one, fy);
    const __m512i x0 = _mm512_cvttps_epi32(x0f), y0 = _mm512_cvttps_epi32(y0f);
    const __m512i x1 = _mm512_add_epi32(x0, _mm512_set1_epi32(1)), y1 = _mm512_add_epi32(y0, _mm512_set1_epi32(1));
    const __m512i zero = _mm512_setzero_si512();
    const __mmask16 x0_in = _mm512_cmpge_epi32_mask(x0, zero), x1_in = _mm512_cmplt_epi32_mask(x1, c.w_int);
    const __mmask16 y0_in = _mm512_cmpge_epi32_mask(y0, zero), y1_in = _mm512_cmplt_epi32_mask(y1, c.h_int);
    const __m512 corner[4] = {_mm512_mul_ps(gy, gx), _mm512_mul_ps(gy, fx), _mm512_mul_ps(fy, gx), _mm512_mul_ps(fy, fx)};
    const __mmask16 in[4] = {static_cast<__mmask16>(inside & x0_in & y0_in), static_cast<__mmask16>(inside & x1_in & y0_in),
                             static_cast<__mmask16>(inside & x0_in & y1_in), static_cast<__mmask16>(inside & x1_in & y1_in)};
    const __m512i xs[4] = {x0, x1, x0, x1}, ys[4] = {y0, y0, y1, y1};
    for (int k = 0; k < 4; ++k) {
        _mm512_storeu_ps(weights + 16 * k, _mm512_maskz_mul_ps(in[k], a, corner[k]));
        const __m512i at = _mm512_add_epi32(c.start, _mm512_add_epi32(_mm512_mullo_epi32(ys[k], c.w_int), xs[k]));
        _mm512_storeu_si512(index + 16 * k, _mm512_mask_mov_epi32(c.outside, in[k], at));
    }
}
#endif

struct Sizes {
    int64_t bs, keys, queries, heads, channels, levels, points, ref_dim;
    bool softmax;  // the weights are logits, softmaxed per (query, head) here
    const uint8_t* padding;  // (bs, keys): nonzero on padding tokens, read as zeros
};

// The levels' sizes and where each starts among the keys.
struct Geometry {
    const std::vector<int64_t>& level_hw;  // (h, w) per level
    const std::vector<int64_t>& starts;
    const std::vector<float>& widths;
    const std::vector<float>& heights;
};

#if !defined(__AVX512F__)
struct Lanes {};
#endif

// Queries [q_begin, q_end) of image b, head h. ``head_value``: that head's first channel of key 0, keys
// ``stride`` elements apart (the per-head copy, or the value where it lies). ``check_padding``: read padding
// tokens as zeros by the mask (false for the per-head copy, which holds them as zeros).
template <int CHANNELS, typename T>
void sample_queries(const T* head_value, int64_t stride, const Geometry& g, const float* reference, const T* offsets,
                    const T* weights, T* out, const Sizes& s, int64_t b, int64_t h, int64_t q_begin, int64_t q_end,
                    bool vector16, const Lanes& lanes, bool check_padding) {
    const int64_t channels = CHANNELS > 0 ? CHANNELS : s.channels;
    const int64_t dim = s.heads * channels;
    const int64_t per_head = s.levels * s.points;
    std::vector<float> xs(per_head), ys(per_head), ws(per_head);
    const uint8_t* pad = s.padding + b * s.keys;
    // A local array (not heap memory the compiler must assume the value pointer may alias): with a fixed
    // channel count the accumulator stays in vector registers.
    alignas(64) float acc[CHANNELS > 0 ? CHANNELS : kMaxChannels];
    for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t bq = b * s.queries + q;
        const float* ref = reference + bq * s.levels * s.ref_dim;
        const T* off = offsets + (bq * s.heads + h) * per_head * 2;
        const T* attn = weights + (bq * s.heads + h) * per_head;
#if defined(__AVX512F__)
        if constexpr (CHANNELS == 32) {
            if (vector16) {
                __m512 a = load16(attn);
                if (s.softmax) {  // one (query, head)'s 16 logits: one register
                    const __m512 e = exp512(_mm512_sub_ps(a, _mm512_set1_ps(_mm512_reduce_max_ps(a))));
                    a = _mm512_mul_ps(e, _mm512_set1_ps(1.f / _mm512_reduce_add_ps(e)));
                }
                alignas(64) float cw[64];
                alignas(64) int32_t ci[64];
                corners16(lanes, ref, s.ref_dim, off, a, cw, ci);
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                for (int i = 0; i < 16; ++i)
                    for (int k = 0; k < 4; ++k) {
                        const float w = cw[16 * k + i];
                        const int64_t at = ci[16 * k + i];
                        const T* v = at == s.keys || (check_padding && pad[at]) ? reinterpret_cast<const T*>(kZeros)
                                                                                : head_value + at * stride;
                        const __m512 wv = _mm512_set1_ps(w);
                        a0 = _mm512_fmadd_ps(wv, load16(v), a0);
                        a1 = _mm512_fmadd_ps(wv, load16(v + 16), a1);
                    }
                store16(out + bq * dim + h * 32, a0);
                store16(out + bq * dim + h * 32 + 16, a1);
                continue;
            }
        }
#else
        (void)vector16;
        (void)lanes;
#endif
        // Sample positions in pixels, as groundingdino and grid_sample compute them: location =
        // ref + offset / (w, h) (boxes: ref_xy + offset / points * ref_wh * 0.5), grid = 2 * location - 1,
        // pixel = ((grid + 1) * size - 1) / 2.
        for (int64_t i = 0; i < per_head; ++i) {
            const int64_t l = i / s.points;
            const float* rl = ref + l * s.ref_dim;
            const float ox = widen(off[2 * i]), oy = widen(off[2 * i + 1]);
            float lx, ly;
            if (s.ref_dim == 2) {
                lx = rl[0] + ox / g.widths[l];
                ly = rl[1] + oy / g.heights[l];
            } else {
                lx = rl[0] + ox / static_cast<float>(s.points) * rl[2] * 0.5f;
                ly = rl[1] + oy / static_cast<float>(s.points) * rl[3] * 0.5f;
            }
            xs[i] = ((2.f * lx - 1.f + 1.f) * g.widths[l] - 1.f) * 0.5f;
            ys[i] = ((2.f * ly - 1.f + 1.f) * g.heights[l] - 1.f) * 0.5f;
        }
        std::transform(attn, attn + per_head, ws.begin(), [](T x) { return widen(x); });
        if (s.softmax) {
            const float top = *std::max_element(ws.begin(), ws.end());
            float sum = 0.f;
            for (int64_t i = 0; i < per_head; ++i) sum += (ws[i] = std::exp(ws[i] - top));
            for (int64_t i = 0; i < per_head; ++i) ws[i] /= sum;
        }
        std::fill(acc, acc + channels, 0.f);
        for (int64_t i = 0; i < per_head; ++i) {
            const int64_t l = i / s.points;
            const int64_t h_l = g.level_hw[2 * l], w_l = g.level_hw[2 * l + 1];
            // All four corners outside the map (or a NaN position): nothing to add, as grid_sample's zeros
            // padding gives. Checked in float, before a far position is converted to an integer.
            if (!(xs[i] > -1.f && xs[i] < g.widths[l] && ys[i] > -1.f && ys[i] < g.heights[l])) continue;
            const float x0f = std::floor(xs[i]), y0f = std::floor(ys[i]);
            const float fx = xs[i] - x0f, fy = ys[i] - y0f;
            const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
            const float corner[4] = {(1.f - fy) * (1.f - fx), (1.f - fy) * fx, fy * (1.f - fx), fy * fx};
            const T* level_value = head_value + g.starts[l] * stride;
            const float a = ws[i];
            for (int k = 0; k < 4; ++k) {
                const int64_t x = x0 + (k & 1), y = y0 + (k >> 1);
                if (x < 0 || x >= w_l || y < 0 || y >= h_l) continue;  // zeros padding
                if (check_padding && pad[g.starts[l] + y * w_l + x]) continue;  // a padding token's value: zeros
                const float w = a * corner[k];
                const T* v = level_value + (y * w_l + x) * stride;
                for (int64_t c = 0; c < channels; ++c) acc[c] += w * widen(v[c]);
            }
        }
        for (int64_t c = 0; c < channels; ++c) put(out + bq * dim + h * channels + c, acc[c]);
    }
}

// CHANNELS > 0 fixes the per-head channel count at compile time (Grounding DINO: 256 / 8 = 32), so the
// innermost loop is a few full vector FMAs; 0 reads it from ``sizes``. T: the value's, offsets', weights' and
// output's type (float or bf16); the sums are float.
template <int CHANNELS, typename T>
void sample(const T* value, const std::vector<int64_t>& level_hw, const float* reference, const T* offsets,
            const T* weights, T* out, const Sizes& s) {
    const int64_t channels = CHANNELS > 0 ? CHANNELS : s.channels;
    const int64_t dim = s.heads * channels;
    const int64_t per_head = s.levels * s.points;
    std::vector<int64_t> starts(s.levels);
    std::vector<float> widths(s.levels), heights(s.levels);
    for (int64_t l = 0, start = 0; l < s.levels; ++l) {
        starts[l] = start;
        heights[l] = static_cast<float>(level_hw[2 * l]);
        widths[l] = static_cast<float>(level_hw[2 * l + 1]);
        start += level_hw[2 * l] * level_hw[2 * l + 1];
    }
    // Each head's maps made contiguous, (bs, heads, keys, C): one head's samples then fall within a map of
    // keys x C floats (2.3 MB at 800 px) that one core's cache holds, instead of strided across all heads.
    // Not for few queries (the decoder's 900 against 17.8 k keys at 800 px): there the copy cost more than
    // the sampling, which then reads the value where it lies (scratch harness: 2.1 -> 0.8 ms per call; with
    // as many queries as keys the copy pays: 17 against 22 ms).
    const bool direct = s.queries * 4 < s.keys;
    // Kept in the value's own type: in bf16, a head's map is half the size (1.2 MB at 800 px, within one
    // core's L2) and a 32-channel sample one cache line (scratch harness, one encoder layer's node at 800 px,
    // 2 threads: 19.8-20.6 -> 18.8-19.1 ms, the same output bit for bit). Padding tokens are written as
    // zeros here, so the sampling loop reads them without checking the mask.
    std::vector<T> by_head(direct ? 0 : static_cast<size_t>(s.bs * s.heads * s.keys * channels));
    if (!direct) tbb::parallel_for(tbb::blocked_range<int64_t>(0, s.bs * s.keys, 512), [&](const tbb::blocked_range<int64_t>& r) {
        for (int64_t bk = r.begin(); bk < r.end(); ++bk) {
            const int64_t b = bk / s.keys, k = bk % s.keys;
            const T* src = value + bk * dim;
            const bool padded = s.padding[bk] != 0;
            for (int64_t h = 0; h < s.heads; ++h) {
                T* dst = by_head.data() + ((b * s.heads + h) * s.keys + k) * channels;
                if (padded) {
                    std::fill(dst, dst + channels, T{});  // 0 bits: zero in f32 and in bf16
                } else {
                    std::copy(src + h * channels, src + (h + 1) * channels, dst);
                }
            }
        }
    });
    Lanes lanes{};
#if defined(__AVX512F__)
    // Sample i of a head is level i / points: its level's constants in lane i (GroundingDINO: 4 x 4 = 16 lanes).
    // int32 indices: the maps of one head stay far below 2^31 tokens.
    const bool vector16 = CHANNELS == 32 && per_head == 16 && s.keys < (int64_t(1) << 31) && s.ref_dim * s.levels <= 16;
    if (vector16) {
        alignas(64) float wf[16], hf[16], pf[16];
        alignas(64) int32_t st[16], wi[16], hi[16], rx[16], ry[16], rw[16], rh[16];
        for (int i = 0; i < 16; ++i) {
            const int64_t l = i / s.points;
            wf[i] = widths[l]; hf[i] = heights[l]; pf[i] = static_cast<float>(s.points);
            st[i] = static_cast<int32_t>(starts[l]);
            wi[i] = static_cast<int32_t>(level_hw[2 * l + 1]); hi[i] = static_cast<int32_t>(level_hw[2 * l]);
            rx[i] = static_cast<int32_t>(l * s.ref_dim); ry[i] = rx[i] + 1; rw[i] = rx[i] + 2; rh[i] = rx[i] + 3;
        }
        lanes = Lanes{_mm512_load_ps(wf), _mm512_load_ps(hf), _mm512_load_ps(pf), _mm512_load_si512(st),
                      _mm512_load_si512(wi), _mm512_load_si512(hi), _mm512_load_si512(rx), _mm512_load_si512(ry),
                      _mm512_load_si512(rw), _mm512_load_si512(rh), _mm512_set1_epi32(static_cast<int32_t>(s.keys)),
                      static_cast<__mmask16>((1u << (s.levels * s.ref_dim)) - 1u)};
    }
#else
    const bool vector16 = false;
    (void)per_head;
#endif
    const int64_t block = 128;  // queries per task: enough work per task, and many tasks for two threads
    const int64_t blocks = (s.queries + block - 1) / block;
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, s.bs * s.heads * blocks), [&](const tbb::blocked_range<int64_t>& r) {
        for (int64_t task = r.begin(); task < r.end(); ++task) {
            const int64_t bh = task / blocks, b = bh / s.heads, h = bh % s.heads;
            const int64_t q_begin = (task % blocks) * block, q_end = std::min(s.queries, q_begin + block);
            const Geometry geometry{level_hw, starts, widths, heights};
            if (direct) {
                sample_queries<CHANNELS>(value + b * s.keys * dim + h * channels, dim, geometry, reference, offsets,
                                         weights, out, s, b, h, q_begin, q_end, vector16, lanes, true);
            } else {
                sample_queries<CHANNELS>(by_head.data() + bh * s.keys * channels, channels,
                                         geometry, reference, offsets, weights, out, s, b, h, q_begin, q_end, vector16,
                                         lanes, false);
            }
        }
    });
}

}  // namespace

bool DeformableAttention::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Shape& value = inputs[0].get_shape();
    const ov::Shape& shapes = inputs[1].get_shape();
    const ov::Shape& reference = inputs[2].get_shape();
    const ov::Shape& offsets = inputs[3].get_shape();
    const ov::Shape& weights = inputs[4].get_shape();
    OPENVINO_ASSERT(value.size() == 3 && shapes.size() == 2 && shapes[1] == 2 && reference.size() == 4
                    && offsets.size() == 3 && weights.size() == 3, "DeformableAttention: inputs of wrong rank");
    Sizes s{};
    s.bs = static_cast<int64_t>(value[0]);
    s.keys = static_cast<int64_t>(value[1]);
    s.heads = m_heads;
    s.points = m_points;
    s.levels = static_cast<int64_t>(shapes[0]);
    s.queries = static_cast<int64_t>(weights[1]);
    s.ref_dim = static_cast<int64_t>(reference[3]);
    OPENVINO_ASSERT(value[2] % m_heads == 0, "DeformableAttention: value width ", value[2], " not a multiple of ",
                    m_heads, " heads");
    s.channels = static_cast<int64_t>(value[2]) / m_heads;
    OPENVINO_ASSERT(s.channels <= kMaxChannels, "DeformableAttention: at most ", kMaxChannels, " channels per head");
    const int64_t per_query = s.heads * s.levels * s.points;
    OPENVINO_ASSERT(reference[0] == value[0] && reference[1] == weights[1] && static_cast<int64_t>(reference[2]) == s.levels
                    && (s.ref_dim == 2 || s.ref_dim == 4),
                    "DeformableAttention: reference_points must be (bs, queries, levels, 2 or 4)");
    OPENVINO_ASSERT(offsets[0] == value[0] && offsets[1] == weights[1] && static_cast<int64_t>(offsets[2]) == 2 * per_query
                    && weights[0] == value[0] && static_cast<int64_t>(weights[2]) == per_query,
                    "DeformableAttention: offsets / weights do not match heads x levels x points");
    std::vector<int64_t> level_hw(2 * s.levels);
    int64_t total = 0;
    for (int64_t i = 0; i < 2 * s.levels; ++i) {
        level_hw[i] = inputs[1].get_element_type() == ov::element::i64 ? inputs[1].data<const int64_t>()[i]
                                                                       : inputs[1].data<const int32_t>()[i];
        OPENVINO_ASSERT(level_hw[i] > 0, "DeformableAttention: level sizes must be positive");
        if (i % 2 == 1) total += level_hw[i - 1] * level_hw[i];
    }
    OPENVINO_ASSERT(total == s.keys, "DeformableAttention: the levels hold ", total, " tokens, value has ", s.keys);
    const ov::Shape& padding = inputs[5].get_shape();
    OPENVINO_ASSERT(padding.size() == 2 && padding[0] == value[0] && padding[1] == value[1]
                    && byte_mask(inputs[5].get_element_type()),
                    "DeformableAttention: padding must be (bs, keys) boolean");
    s.padding = static_cast<const uint8_t*>(inputs[5].data());
    s.softmax = m_softmax;
    outputs[0].set_shape(ov::Shape{value[0], weights[1], value[2]});
    // Reference points in f32 (as the positions are computed), whatever their type.
    std::vector<float> widened;
    const float* r = inputs[2].get_element_type() == ov::element::f32 ? inputs[2].data<const float>() : nullptr;
    if (r == nullptr) {
        OPENVINO_ASSERT(inputs[2].get_element_type() == ov::element::bf16,
                        "DeformableAttention: reference_points must be f32 or bf16");
        const bf16* narrow = static_cast<const bf16*>(inputs[2].data());
        widened.resize(inputs[2].get_size());
        std::transform(narrow, narrow + widened.size(), widened.begin(), [](bf16 x) { return widen(x); });
        r = widened.data();
    }
    const auto run = [&](auto type) {
        using T = decltype(type);
        const T* v = static_cast<const T*>(inputs[0].data());
        const T* o = static_cast<const T*>(inputs[3].data());
        const T* w = static_cast<const T*>(inputs[4].data());
        T* out = static_cast<T*>(outputs[0].data());
        if (s.channels == 32) {
            sample<32>(v, level_hw, r, o, w, out, s);
        } else {
            sample<0>(v, level_hw, r, o, w, out, s);
        }
    };
    const auto type = inputs[0].get_element_type();
    OPENVINO_ASSERT(inputs[3].get_element_type() == type && inputs[4].get_element_type() == type,
                    "DeformableAttention: value, offsets and weights must be of one type");
    if (type == ov::element::bf16) {
        run(bf16{});
    } else {
        OPENVINO_ASSERT(type == ov::element::f32, "DeformableAttention: value must be f32 or bf16, got ", type);
        run(float{});
    }
    return true;
}

}  // namespace gsam
