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
// Inputs (f32 unless said):
//   0 value (bs, keys, heads * C): the projected value tokens, levels one after another, row-major
//   1 spatial_shapes (levels, 2) i64 or i32: each level's (h, w); the sum of h * w must equal keys
//   2 reference_points (bs, queries, levels, 2) points (x, y) or (bs, queries, levels, 4) boxes (cx, cy, w, h)
//   3 offsets (bs, queries, heads * levels * points * 2): the sampling_offsets projection, (x, y) last
//   4 weights (bs, queries, heads * levels * points): the softmaxed attention weights
// Attributes: heads, points. Output: (bs, queries, heads * C).

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace gsam {

class DeformableAttention : public ov::op::Op {
public:
    OPENVINO_OP("DeformableAttention", "gsam_opset");

    DeformableAttention() = default;
    DeformableAttention(const ov::OutputVector& args, int64_t heads, int64_t points)
        : Op(args), m_heads(heads), m_points(points) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 5, "expects 5 inputs, got ", get_input_size());
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
        return std::make_shared<DeformableAttention>(args, m_heads, m_points);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("heads", m_heads);
        visitor.on_attribute("points", m_points);
        return true;
    }

    bool has_evaluate() const override {
        return get_input_element_type(0) == ov::element::f32;
    }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    int64_t m_heads = 0;
    int64_t m_points = 0;
};

namespace {

constexpr int64_t kMaxChannels = 1024;  // per head, for the generic (unfixed) channel count

struct Sizes {
    int64_t bs, keys, queries, heads, channels, levels, points, ref_dim;
};

// CHANNELS > 0 fixes the per-head channel count at compile time (Grounding DINO: 256 / 8 = 32), so the
// innermost loop is a few full vector FMAs; 0 reads it from ``sizes``.
template <int CHANNELS>
void sample(const float* value, const std::vector<int64_t>& level_hw, const float* reference, const float* offsets,
            const float* weights, float* out, const Sizes& s) {
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
    std::vector<float> by_head(static_cast<size_t>(s.bs * s.keys * dim));
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, s.bs * s.keys, 512), [&](const tbb::blocked_range<int64_t>& r) {
        for (int64_t bk = r.begin(); bk < r.end(); ++bk) {
            const int64_t b = bk / s.keys, k = bk % s.keys;
            const float* src = value + bk * dim;
            for (int64_t h = 0; h < s.heads; ++h) {
                float* dst = by_head.data() + ((b * s.heads + h) * s.keys + k) * channels;
                std::copy(src + h * channels, src + (h + 1) * channels, dst);
            }
        }
    });
    const int64_t block = 128;  // queries per task: enough work per task, and many tasks for two threads
    const int64_t blocks = (s.queries + block - 1) / block;
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, s.bs * s.heads * blocks), [&](const tbb::blocked_range<int64_t>& r) {
        std::vector<float> xs(per_head), ys(per_head);
        // A local array (not heap memory the compiler must assume the value pointer may alias): with a fixed
        // channel count the accumulator stays in vector registers.
        alignas(64) float acc[CHANNELS > 0 ? CHANNELS : kMaxChannels];
        for (int64_t task = r.begin(); task < r.end(); ++task) {
            const int64_t bh = task / blocks, b = bh / s.heads, h = bh % s.heads;
            const int64_t q_begin = (task % blocks) * block, q_end = std::min(s.queries, q_begin + block);
            const float* head_value = by_head.data() + bh * s.keys * channels;
            for (int64_t q = q_begin; q < q_end; ++q) {
                const int64_t bq = b * s.queries + q;
                const float* ref = reference + bq * s.levels * s.ref_dim;
                const float* off = offsets + (bq * s.heads + h) * per_head * 2;
                const float* attn = weights + (bq * s.heads + h) * per_head;
                // Sample positions in pixels, as groundingdino and grid_sample compute them: location =
                // ref + offset / (w, h) (boxes: ref_xy + offset / points * ref_wh * 0.5), grid = 2 * location - 1,
                // pixel = ((grid + 1) * size - 1) / 2.
                for (int64_t i = 0; i < per_head; ++i) {
                    const int64_t l = i / s.points;
                    const float* rl = ref + l * s.ref_dim;
                    float lx, ly;
                    if (s.ref_dim == 2) {
                        lx = rl[0] + off[2 * i] / widths[l];
                        ly = rl[1] + off[2 * i + 1] / heights[l];
                    } else {
                        lx = rl[0] + off[2 * i] / static_cast<float>(s.points) * rl[2] * 0.5f;
                        ly = rl[1] + off[2 * i + 1] / static_cast<float>(s.points) * rl[3] * 0.5f;
                    }
                    xs[i] = ((2.f * lx - 1.f + 1.f) * widths[l] - 1.f) * 0.5f;
                    ys[i] = ((2.f * ly - 1.f + 1.f) * heights[l] - 1.f) * 0.5f;
                }
                std::fill(acc, acc + channels, 0.f);
                for (int64_t i = 0; i < per_head; ++i) {
                    const int64_t l = i / s.points;
                    const int64_t h_l = level_hw[2 * l], w_l = level_hw[2 * l + 1];
                    // All four corners outside the map (or a NaN position): nothing to add, as grid_sample's zeros
                    // padding gives. Checked in float, before a far position is converted to an integer.
                    if (!(xs[i] > -1.f && xs[i] < widths[l] && ys[i] > -1.f && ys[i] < heights[l])) continue;
                    const float x0f = std::floor(xs[i]), y0f = std::floor(ys[i]);
                    const float fx = xs[i] - x0f, fy = ys[i] - y0f;
                    const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
                    const float corner[4] = {(1.f - fy) * (1.f - fx), (1.f - fy) * fx, fy * (1.f - fx), fy * fx};
                    const float* level_value = head_value + starts[l] * channels;
                    for (int k = 0; k < 4; ++k) {
                        const int64_t x = x0 + (k & 1), y = y0 + (k >> 1);
                        if (x < 0 || x >= w_l || y < 0 || y >= h_l) continue;  // zeros padding
                        const float w = attn[i] * corner[k];
                        const float* v = level_value + (y * w_l + x) * channels;
                        for (int64_t c = 0; c < channels; ++c) acc[c] += w * v[c];
                    }
                }
                std::copy(acc, acc + channels, out + bq * dim + h * channels);
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
    outputs[0].set_shape(ov::Shape{value[0], weights[1], value[2]});
    const float* v = inputs[0].data<const float>();
    const float* r = inputs[2].data<const float>();
    const float* o = inputs[3].data<const float>();
    const float* w = inputs[4].data<const float>();
    float* out = outputs[0].data<float>();
    if (s.channels == 32) {
        sample<32>(v, level_hw, r, o, w, out, s);
    } else {
        sample<0>(v, level_hw, r, o, w, out, s);
    }
    return true;
}

}  // namespace gsam
