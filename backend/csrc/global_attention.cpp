// SAM's global-block attention with the explanation's reductions, as one OpenVINO operation for the CPU plugin.
//
// The capture graph (backend/encoder_graph.py) needs, besides a global block's output, the attention each
// key receives from the image's own queries (and, at the last global block, the head-averaged N x N matrix).
// A fused attention (OpenVINO's SDPA) never holds the probabilities, so the graph wrote them out instead:
// logits, the relative-position add and the softmax each read and wrote N x N per head, ~1.24x the plain
// encoder's time. Here a block of 32 queries takes its logits for all keys into a buffer that stays in
// cache, adds the relative-position terms, takes the softmax, and reduces the probabilities to the key sums
// (and the head mean) right there before multiplying them with the values: nothing N x N is written but
// the matrix asked for. On CPUs with AMX the two products run on its tiles in bf16 with f32 sums (the
// ``bf16`` attribute, set for graphs compiled at bf16); elsewhere, and for f32 graphs, in f32.
//
// Inputs (f32):
//   0 q (B, N, heads * d): the queries, unscaled
//   1 k (B, N, heads * d)
//   2 v (B, N, heads * d)
//   3 rel_h (B, heads, N, H): the decomposed relative-position terms by key row (H * W == N)
//   4 rel_w (B, heads, N, W): and by key column
//   5 query_weights (B, N): each query's weight in ``received``
// Attributes: heads, scale (applied to q . k, not to the terms), matrix (also outputs 2 and 3), bf16.
// Outputs: 0 (B, N, heads * d) the attention's output, heads on the channels;
//          1 received (B, N) = mean_h sum_i w_i P_h[i, j];
//          2 column mean (B, N) = mean_i mean_h P_h[i, j] and 3 matrix (B, N, N) f16 = mean_h P_h (matrix only).

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/type/float16.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/enumerable_thread_specific.h>
#include <tbb/parallel_for.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define GSAM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace gsam {

class GlobalAttention : public ov::op::Op {
public:
    OPENVINO_OP("GlobalAttention", "gsam_opset");

    GlobalAttention() = default;
    GlobalAttention(const ov::OutputVector& args, int64_t heads, float scale, bool matrix, bool bf16)
        : Op(args), m_heads(heads), m_scale(scale), m_matrix(matrix), m_bf16(bf16) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 6, "expects 6 inputs, got ", get_input_size());
        NODE_VALIDATION_CHECK(this, m_heads > 0, "heads must be positive");
        const auto& q = get_input_partial_shape(0);
        ov::PartialShape out = ov::PartialShape::dynamic(3);
        ov::PartialShape row = ov::PartialShape::dynamic(2);
        ov::PartialShape square = ov::PartialShape::dynamic(3);
        if (q.rank().is_static()) {
            NODE_VALIDATION_CHECK(this, q.rank().get_length() == 3, "q must be rank 3 (B, N, heads * d)");
            out = q;
            row = ov::PartialShape{q[0], q[1]};
            square = ov::PartialShape{q[0], q[1], q[1]};
        }
        const auto type = get_input_element_type(0);
        set_output_size(m_matrix ? 4 : 2);
        set_output_type(0, type, out);
        set_output_type(1, type, row);
        if (m_matrix) {
            set_output_type(2, type, row);
            set_output_type(3, ov::element::f16, square);
        }
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<GlobalAttention>(args, m_heads, m_scale, m_matrix, m_bf16);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("heads", m_heads);
        visitor.on_attribute("scale", m_scale);
        visitor.on_attribute("matrix", m_matrix);
        visitor.on_attribute("bf16", m_bf16);
        return true;
    }

    bool has_evaluate() const override {
        return get_input_element_type(0) == ov::element::f32;
    }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    int64_t m_heads = 0;
    float m_scale = 1.f;
    bool m_matrix = false;
    bool m_bf16 = false;
};

namespace {

constexpr int64_t kRows = 32;  // queries per task: two AMX tile rows; their logits for 4096 keys are 512 KB

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct Dims {
    int64_t batch, n, heads, d, grid_h, grid_w;
    int64_t n_pad;  // keys and queries, padded to kRows
    int64_t d_pad;  // head width padded to 32 (a bf16 tile's depth)
    int64_t dv;     // head width padded to 16 (a tile's columns)
};

struct Inputs {
    const float *q, *k, *v, *rel_h, *rel_w, *weights;
};

struct Outputs {
    float* out;
    float* received;
    float* column_mean;      // nullptr without the matrix
    ov::float16* matrix;     // nullptr without the matrix
};

#include "softmax_rows.hpp"

// The task-local sums (received, and the matrix's columns) of every thread, per batch item.
using Sums = tbb::enumerable_thread_specific<std::vector<float>>;

void finish(const Dims& s, Sums& received_sums, Sums& column_sums, const Outputs& o) {
    std::fill(o.received, o.received + s.batch * s.n, 0.f);
    for (auto& part : received_sums)
        for (int64_t b = 0; b < s.batch; ++b)
            for (int64_t j = 0; j < s.n; ++j) o.received[b * s.n + j] += part[b * s.n_pad + j] / s.heads;
    if (!o.column_mean) return;
    std::fill(o.column_mean, o.column_mean + s.batch * s.n, 0.f);
    for (auto& part : column_sums)
        for (int64_t b = 0; b < s.batch; ++b)
            for (int64_t j = 0; j < s.n; ++j) o.column_mean[b * s.n + j] += part[b * s.n_pad + j] / s.n;
}

// The block's mean rows into the f16 matrix, and into the column sums.
void write_mean(const float* mean, int64_t b, int64_t r0, const Dims& s, const Outputs& o, float* columns) {
    for (int64_t i = 0; i < kRows && r0 + i < s.n; ++i) {
        const float* row = mean + i * s.n_pad;
        ov::float16* dst = o.matrix + (b * s.n + r0 + i) * s.n;
        int64_t j = 0;
#if defined(__AVX512F__)
        for (; j + 16 <= s.n; j += 16) {
            const __m512 x = _mm512_loadu_ps(row + j);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
            _mm512_storeu_ps(columns + j, _mm512_add_ps(_mm512_loadu_ps(columns + j), x));
        }
#endif
        for (; j < s.n; ++j) {
            dst[j] = ov::float16(row[j]);
            columns[j] += row[j];
        }
    }
}

// ---- f32: any CPU, and graphs compiled at f32 -------------------------------------------------------------

void attend_f32(const Dims& s, const Inputs& in, float scale, const Outputs& o) {
    const int64_t c_all = s.heads * s.d;
    // k per head transposed, (B, heads, d, N): the logits of a query then accumulate along contiguous keys.
    std::vector<float> kt(static_cast<size_t>(s.batch * s.heads * s.d * s.n_pad), 0.f);
    tbb::parallel_for(int64_t(0), s.batch * s.heads, [&](int64_t bh) {
        const int64_t b = bh / s.heads, h = bh % s.heads;
        for (int64_t j = 0; j < s.n; ++j)
            for (int64_t c = 0; c < s.d; ++c) kt[(bh * s.d + c) * s.n_pad + j] = in.k[(b * s.n + j) * c_all + h * s.d + c];
    });
    Sums received_sums(std::vector<float>(s.batch * s.n_pad, 0.f)), column_sums(std::vector<float>(s.batch * s.n_pad, 0.f));
    const int64_t blocks = s.n_pad / kRows;
    tbb::parallel_for(int64_t(0), s.batch * blocks, [&](int64_t task) {
        const int64_t b = task / blocks, r0 = (task % blocks) * kRows;
        std::vector<float> row(s.n_pad), out(s.d);
        std::vector<float> mean(o.matrix ? kRows * s.n_pad : 0, 0.f);
        float* received = received_sums.local().data() + b * s.n_pad;
        for (int64_t h = 0; h < s.heads; ++h) {
            const float* kh = kt.data() + (b * s.heads + h) * s.d * s.n_pad;
            for (int64_t i = 0; i < kRows && r0 + i < s.n; ++i) {
                const int64_t qi = r0 + i;
                const float* q = in.q + (b * s.n + qi) * c_all + h * s.d;
                std::fill(row.begin(), row.end(), 0.f);
                for (int64_t c = 0; c < s.d; ++c) {
                    const float qc = q[c] * scale;
                    const float* kc = kh + c * s.n_pad;
                    for (int64_t j = 0; j < s.n; ++j) row[j] += qc * kc[j];
                }
                const int64_t term = ((b * s.heads + h) * s.n + qi);
                const float inv = exp_row(row.data(), in.rel_h + term * s.grid_h, in.rel_w + term * s.grid_w,
                                          s.grid_h, s.grid_w);
                spread_row(row.data(), inv, s.n, in.weights[b * s.n + qi], received,
                           o.matrix ? mean.data() + i * s.n_pad : nullptr, 1.f / s.heads, nullptr);
                std::fill(out.begin(), out.end(), 0.f);
                for (int64_t j = 0; j < s.n; ++j) {
                    const float p = row[j] * inv;
                    const float* v = in.v + (b * s.n + j) * c_all + h * s.d;
                    for (int64_t c = 0; c < s.d; ++c) out[c] += p * v[c];
                }
                std::copy(out.begin(), out.end(), o.out + (b * s.n + qi) * c_all + h * s.d);
            }
        }
        if (o.matrix) write_mean(mean.data(), b, r0, s, o, column_sums.local().data() + b * s.n_pad);
    });
    finish(s, received_sums, column_sums, o);
}

// ---- bf16 on AMX tiles ------------------------------------------------------------------------------------

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

void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.colsb[t] = 64;  // 16 f32 or 32 bf16
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

// 16 floats as bf16, rounded to nearest even.
inline __m256i bf16x16(__m512 x) {
    const __m256bh b = _mm512_cvtneps_pbh(x);
    __m256i out;
    std::memcpy(&out, &b, sizeof(out));
    return out;
}

void attend_amx(const Dims& s, const Inputs& in, float scale, const Outputs& o) {
    const int64_t c_all = s.heads * s.d;
    const int64_t pairs_d = s.d_pad / 2, pairs_n = s.n_pad / 2;
    // Row strides one cache line longer than the rows: 16 rows 16 KB (or 8 KB) apart would all fall in one
    // set of the L1 cache, and a tile's 16 rows would evict each other.
    const int64_t ks = s.n_pad + 16;  // k's pairs per row (key pairs of one channel pair)
    const int64_t ls = s.n_pad + 16;  // logits per row
    const int64_t ps = s.n_pad + 32;  // bf16 probabilities per row
    // Operands in the tiles' layouts, bf16, zero padded: q (B, heads, N_pad, d_pad) scaled; k as the
    // product's B operand, (B, heads, d_pad / 2, ks, 2); v as the second product's, (B, heads, N_pad / 2, dv, 2).
    std::vector<uint16_t> qb(static_cast<size_t>(s.batch * s.heads * s.n_pad * s.d_pad), 0);
    std::vector<uint32_t> kb(static_cast<size_t>(s.batch * s.heads * pairs_d * ks), 0);
    std::vector<uint16_t> vb(static_cast<size_t>(s.batch * s.heads * s.n_pad * s.dv), 0);
    const __m512 scale_q = _mm512_set1_ps(scale);
    // Each channel pair's bf16 values interleaved over two tokens: (a0, b0, a1, b1, ...).
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    tbb::parallel_for(int64_t(0), s.batch * s.heads, [&](int64_t bh) {
        const int64_t b = bh / s.heads, h = bh % s.heads;
        uint16_t* q = qb.data() + bh * s.n_pad * s.d_pad;
        uint32_t* k = kb.data() + bh * pairs_d * ks;
        uint16_t* v = vb.data() + bh * s.n_pad * s.dv;
        for (int64_t j = 0; j < s.n; j += 2) {
            const bool second = j + 1 < s.n;
            const int64_t at = (b * s.n + j) * c_all + h * s.d;  // token j's head h in q, k and v
            for (int64_t c = 0; c < s.d; c += 16) {
                const __mmask16 m = first(s.d - c);
                for (int64_t t = 0; t < (second ? 2 : 1); ++t) {
                    const int64_t from = at + t * c_all + c;
                    _mm256_mask_storeu_epi16(q + (j + t) * s.d_pad + c, m,
                                             bf16x16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, in.q + from), scale_q)));
                    alignas(32) uint32_t pairs[8];
                    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), bf16x16(_mm512_maskz_loadu_ps(m, in.k + from)));
                    for (int64_t p = 0; p < 8 && c + 2 * p < s.d; ++p) k[(c / 2 + p) * ks + j + t] = pairs[p];
                }
                const __m512 lo = _mm512_maskz_loadu_ps(m, in.v + at + c);
                const __m512 hi = second ? _mm512_maskz_loadu_ps(m, in.v + at + c_all + c) : _mm512_setzero_ps();
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16(lo)), bf16x16(hi), 1);
                const int64_t width = std::min<int64_t>(16, s.d - c);
                _mm512_mask_storeu_epi16(v + ((j / 2) * s.dv + c) * 2, (width == 16 ? ~0u : (1u << (2 * width)) - 1u),
                                         _mm512_permutexvar_epi16(interleave, both));
            }
        }
    });
    Sums received_sums(std::vector<float>(s.batch * s.n_pad, 0.f)), column_sums(std::vector<float>(s.batch * s.n_pad, 0.f));
    // Without the matrix a task is one head for one block of queries, and a thread's tasks run a head's
    // blocks in turn, so that head's k and v (1 MB at 4096 tokens) stay in its cache. With it a task runs
    // every head on its block, so the head mean is summed in a 32-row buffer rather than the whole matrix.
    const int64_t blocks = s.n_pad / kRows;
    const int64_t task_heads = o.matrix ? s.heads : 1, groups = s.heads / task_heads;
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, s.batch * groups * blocks), [&](const tbb::blocked_range<int64_t>& range) {
        configure_tiles();
        std::vector<float> logits(static_cast<size_t>(kRows * ls));
        std::vector<uint16_t> probs(static_cast<size_t>(kRows * ps), 0);
        std::vector<float> out(static_cast<size_t>(kRows * s.dv));
        std::vector<float> mean(o.matrix ? kRows * s.n_pad : 0);
        for (int64_t task = range.begin(); task < range.end(); ++task) {
            const int64_t group = task / blocks, r0 = (task % blocks) * kRows;
            const int64_t b = group / groups, h0 = (group % groups) * task_heads;
            float* received = received_sums.local().data() + b * s.n_pad;
            std::fill(mean.begin(), mean.end(), 0.f);
            for (int64_t h = h0; h < h0 + task_heads; ++h) {
                const int64_t bh = b * s.heads + h;
                const uint16_t* q = qb.data() + (bh * s.n_pad + r0) * s.d_pad;
                const uint32_t* k = kb.data() + bh * pairs_d * ks;
                const uint16_t* v = vb.data() + bh * s.n_pad * s.dv;
                // logits (32 x N_pad) = q k^T, 32 keys at a time: tiles 0-3 the sums, 4-5 q, 6-7 k.
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
                    float* at = logits.data() + j0;
                    _tile_stored(0, at, ls * 4);
                    _tile_stored(1, at + 16, ls * 4);
                    _tile_stored(2, at + 16 * ls, ls * 4);
                    _tile_stored(3, at + 16 * ls + 16, ls * 4);
                }
                for (int64_t i = 0; i < kRows; ++i) {
                    uint16_t* p = probs.data() + i * ps;
                    const int64_t qi = r0 + i;
                    if (qi >= s.n) {  // padding queries: no probabilities, and their outputs are dropped
                        std::fill(p, p + s.n_pad, 0);
                        continue;
                    }
                    float* row = logits.data() + i * ls;
                    const int64_t term = bh * s.n + qi;
                    const float inv = exp_row(row, in.rel_h + term * s.grid_h, in.rel_w + term * s.grid_w, s.grid_h,
                                              s.grid_w);
                    spread_row(row, inv, s.n, in.weights[b * s.n + qi], received,
                               o.matrix ? mean.data() + i * s.n_pad : nullptr, 1.f / s.heads, p);
                    std::fill(p + s.n, p + s.n_pad, 0);
                }
                // out (32 x dv) = probs v, 32 columns at a time: tiles 0-3 the sums, 4-5 probs, 6-7 v.
                for (int64_t c0 = 0; c0 < s.dv; c0 += 32) {
                    const bool pair = c0 + 16 < s.dv;
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int64_t k0 = 0; k0 < pairs_n; k0 += 16) {
                        _tile_loadd(4, probs.data() + 2 * k0, ps * 2);
                        _tile_loadd(5, probs.data() + 16 * ps + 2 * k0, ps * 2);
                        _tile_loadd(6, v + (k0 * s.dv + c0) * 2, s.dv * 4);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
                        if (pair) {
                            _tile_loadd(7, v + (k0 * s.dv + c0 + 16) * 2, s.dv * 4);
                            _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, out.data() + c0, s.dv * 4);
                    _tile_stored(2, out.data() + 16 * s.dv + c0, s.dv * 4);
                    if (pair) {
                        _tile_stored(1, out.data() + c0 + 16, s.dv * 4);
                        _tile_stored(3, out.data() + 16 * s.dv + c0 + 16, s.dv * 4);
                    }
                }
                for (int64_t i = 0; i < kRows && r0 + i < s.n; ++i)
                    std::copy(out.data() + i * s.dv, out.data() + i * s.dv + s.d, o.out + (b * s.n + r0 + i) * c_all + h * s.d);
            }
            if (o.matrix) write_mean(mean.data(), b, r0, s, o, column_sums.local().data() + b * s.n_pad);
        }
        _tile_release();
    });
    finish(s, received_sums, column_sums, o);
}
#endif

}  // namespace

bool GlobalAttention::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Shape& q = inputs[0].get_shape();
    OPENVINO_ASSERT(q.size() == 3 && q[2] % m_heads == 0, "GlobalAttention: q must be (B, N, heads * d), got ", q);
    for (int i = 1; i < 3; ++i)
        OPENVINO_ASSERT(inputs[i].get_shape() == q, "GlobalAttention: input ", i, " has shape ", inputs[i].get_shape(),
                        ", q has ", q);
    const ov::Shape& rel_h = inputs[3].get_shape();
    const ov::Shape& rel_w = inputs[4].get_shape();
    Dims s{};
    s.batch = static_cast<int64_t>(q[0]);
    s.n = static_cast<int64_t>(q[1]);
    s.heads = m_heads;
    s.d = static_cast<int64_t>(q[2]) / m_heads;
    OPENVINO_ASSERT(rel_h.size() == 4 && rel_w.size() == 4 && rel_h[0] == q[0] && rel_w[0] == q[0]
                    && static_cast<int64_t>(rel_h[1]) == m_heads && static_cast<int64_t>(rel_w[1]) == m_heads
                    && rel_h[2] == q[1] && rel_w[2] == q[1] && rel_h[3] * rel_w[3] == q[1],
                    "GlobalAttention: rel_h ", rel_h, " and rel_w ", rel_w, " must be (B, heads, N, H) and (B, heads, N, W), "
                    "H * W = N, for q ", q);
    OPENVINO_ASSERT(inputs[5].get_shape() == ov::Shape({q[0], q[1]}), "GlobalAttention: query_weights ",
                    inputs[5].get_shape(), " must be (B, N)");
    s.grid_h = static_cast<int64_t>(rel_h[3]);
    s.grid_w = static_cast<int64_t>(rel_w[3]);
    s.n_pad = round_up(s.n, kRows);
    s.d_pad = round_up(s.d, 32);
    s.dv = round_up(s.d, 16);
    outputs[0].set_shape(q);
    outputs[1].set_shape({q[0], q[1]});
    Outputs o{outputs[0].data<float>(), outputs[1].data<float>(), nullptr, nullptr};
    if (m_matrix) {
        outputs[2].set_shape({q[0], q[1]});
        outputs[3].set_shape({q[0], q[1], q[1]});
        o.column_mean = outputs[2].data<float>();
        o.matrix = outputs[3].data<ov::float16>();
    }
    const Inputs in{inputs[0].data<const float>(), inputs[1].data<const float>(), inputs[2].data<const float>(),
                    inputs[3].data<const float>(), inputs[4].data<const float>(), inputs[5].data<const float>()};
    if (s.n == 0) return true;
#ifdef GSAM_AMX
    if (m_bf16 && amx_permitted()) {
        attend_amx(s, in, m_scale, o);
        return true;
    }
#endif
    attend_f32(s, in, m_scale, o);
    return true;
}

}  // namespace gsam
