// The element types the library's operations accept, one definition for all of them.

#pragma once

#include <openvino/core/type/element_type.hpp>

namespace gsam {

// Image-sized inputs and outputs: f32, or bf16 in graphs compiled at bf16 (openvino_ops.OpsLibrary.narrow_io).
inline bool f32_or_bf16(const ov::element::Type& type) {
    return type == ov::element::f32 || type == ov::element::bf16;
}

// A padding mask: boolean in the model; the CPU plugin hands its byte-sized form (u8) to library nodes.
inline bool byte_mask(const ov::element::Type& type) {
    return type == ov::element::boolean || type == ov::element::u8 || type == ov::element::i8;
}

}  // namespace gsam
