// SAM's global-block attention with the explanation's reductions, as one OpenVINO operation for the CPU plugin.
//
// The capture graph (backend/encoder_graph.py) needs, besides a global block's output, the attention each
// key receives from the image's own queries (and, at the last global block, the head-averaged N x N matrix).
// A fused attention (OpenVINO's SDPA) never holds the probabilities, so the graph wrote them out instead:
// logits, the relative-position add and the softmax each read and wrote N x N per head, ~1.24x the plain
// encoder's time. Here a block of 32 queries takes its logits for all keys into a buffer that stays in
// cache, adds the relative-position terms, takes the softmax, and reduces the probabilities to the key sums
// (and the head mean) right there before multiplying them with the values: nothing N x N is written but
// the matrix asked for. With the ``bf16`` attribute (set for graphs compiled at bf16) the two products run
// in bf16 with f32 sums, on AMX tiles or, on CPUs without AMX, on AVX512-BF16's dot products
// (bf16_products.hpp); elsewhere, and for f32 graphs, in f32. The same kernel serves the torch runtime
// through ``gsam_global_attention`` (at the end).
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
#include <tbb/task_arena.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define GSAM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "vector_math.hpp"

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

// ---- bf16 products: AMX tiles or AVX512-BF16 dot products (bf16_products.hpp) ------------------------------

#include "bf16_products.hpp"

#ifdef GSAM_BF16
template <class Products>
void attend_bf16(const Dims& s, const Inputs& in, float scale, const Outputs& o) {
    const int64_t c_all = s.heads * s.d;
    const int64_t pairs_d = s.d_pad / 2;
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
                const __mmask16 m = first_lanes(s.d - c);
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
        Products products;
        products.begin();
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
                products.logits(s, qb.data() + (bh * s.n_pad + r0) * s.d_pad, kb.data() + bh * pairs_d * ks, ks,
                                logits.data(), ls);
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
                products.values(s, probs.data(), ps, vb.data() + bh * s.n_pad * s.dv, out.data());
                for (int64_t i = 0; i < kRows && r0 + i < s.n; ++i)
                    std::copy(out.data() + i * s.dv, out.data() + i * s.dv + s.d, o.out + (b * s.n + r0 + i) * c_all + h * s.d);
            }
            if (o.matrix) write_mean(mean.data(), b, r0, s, o, column_sums.local().data() + b * s.n_pad);
        }
        products.end();
    });
    finish(s, received_sums, column_sums, o);
}
#endif

// Which products run: bf16 ones where asked (``bf16``) and the CPU and the ISA cap allow (AMX before dot
// products), else f32.
void attend(const Dims& s, const Inputs& in, float scale, bool bf16, const Outputs& o) {
#ifdef GSAM_AMX
    if (bf16 && isa_cap() == Bf16Products::amx && amx_permitted()) return attend_bf16<AmxProducts>(s, in, scale, o);
#endif
#ifdef GSAM_BF16
    if (bf16 && isa_cap() != Bf16Products::none) return attend_bf16<DotProducts>(s, in, scale, o);
#endif
    attend_f32(s, in, scale, o);
}

Dims dims(int64_t batch, int64_t n, int64_t heads, int64_t d, int64_t grid_h, int64_t grid_w) {
    return Dims{batch, n, heads, d, grid_h, grid_w, round_up(n, kRows), round_up(d, 32), round_up(d, 16)};
}

}  // namespace

bool GlobalAttention::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Shape& q = inputs[0].get_shape();
    OPENVINO_ASSERT(q.size() == 3 && q[2] % m_heads == 0, "GlobalAttention: q must be (B, N, heads * d), got ", q);
    for (int i = 1; i < 3; ++i)
        OPENVINO_ASSERT(inputs[i].get_shape() == q, "GlobalAttention: input ", i, " has shape ", inputs[i].get_shape(),
                        ", q has ", q);
    const ov::Shape& rel_h = inputs[3].get_shape();
    const ov::Shape& rel_w = inputs[4].get_shape();
    OPENVINO_ASSERT(rel_h.size() == 4 && rel_w.size() == 4 && rel_h[0] == q[0] && rel_w[0] == q[0]
                    && static_cast<int64_t>(rel_h[1]) == m_heads && static_cast<int64_t>(rel_w[1]) == m_heads
                    && rel_h[2] == q[1] && rel_w[2] == q[1] && rel_h[3] * rel_w[3] == q[1],
                    "GlobalAttention: rel_h ", rel_h, " and rel_w ", rel_w, " must be (B, heads, N, H) and (B, heads, N, W), "
                    "H * W = N, for q ", q);
    OPENVINO_ASSERT(inputs[5].get_shape() == ov::Shape({q[0], q[1]}), "GlobalAttention: query_weights ",
                    inputs[5].get_shape(), " must be (B, N)");
    const Dims s = dims(static_cast<int64_t>(q[0]), static_cast<int64_t>(q[1]), m_heads,
                        static_cast<int64_t>(q[2]) / m_heads, static_cast<int64_t>(rel_h[3]),
                        static_cast<int64_t>(rel_w[3]));
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
    if (s.n > 0) attend(s, in, m_scale, m_bf16, o);
    return true;
}

}  // namespace gsam

// The kernel for callers outside OpenVINO (the torch runtime, through ctypes: backend/global_attention.py):
// the node's arithmetic on contiguous f32 arrays in its input and output layouts, on ``threads`` TBB threads.
// ``matrix`` null: no matrix (``column_mean`` is then not written). Returns 0; 1 for sizes that do not fit
// together, 2 when memory ran out.
extern "C" int gsam_global_attention(const float* q, const float* k, const float* v, const float* rel_h,
                                     const float* rel_w, const float* query_weights, int64_t batch, int64_t n,
                                     int64_t heads, int64_t d, int64_t grid_h, int64_t grid_w, float scale, int bf16,
                                     int threads, float* out, float* received, float* column_mean, uint16_t* matrix) {
    if (batch < 0 || n < 0 || heads <= 0 || d <= 0 || grid_h < 0 || grid_w < 0 || grid_h * grid_w != n || threads <= 0
        || (matrix && !column_mean))
        return 1;
    if (batch == 0 || n == 0) return 0;
    const gsam::Dims s = gsam::dims(batch, n, heads, d, grid_h, grid_w);
    const gsam::Inputs in{q, k, v, rel_h, rel_w, query_weights};
    const gsam::Outputs o{out, received, matrix ? column_mean : nullptr, reinterpret_cast<ov::float16*>(matrix)};
    try {
        tbb::task_arena arena(threads);
        arena.execute([&] { gsam::attend(s, in, scale, bf16 != 0, o); });
    } catch (const std::bad_alloc&) {
        return 2;
    }
    return 0;
}
