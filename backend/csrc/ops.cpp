// The project's OpenVINO operations library, one translation unit (backend/openvino_ops.py builds this file).
#include "deformable_attention.cpp"
#include "global_attention.cpp"
#include "fusion_softmax.cpp"

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<gsam::DeformableAttention>>(),
    std::make_shared<ov::OpExtension<gsam::GlobalAttention>>(),
    std::make_shared<ov::OpExtension<gsam::FusionSoftmax>>(),
}));
