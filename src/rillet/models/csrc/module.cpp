// Python bindings of the native CPU kernels. Each call releases the GIL: the kernels touch
// no Python objects, and the server's event loop can run meanwhile.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &rillet::paged_decode_attention, nogil,
        "decode attention over a paged KV cache");
  m.def("paged_prefill_attention", &rillet::paged_prefill_attention, nogil,
        "causal prefill attention over a paged KV cache");
  m.def("add_rms_norm", &rillet::add_rms_norm, nogil, "residual add + RMSNorm");
  m.def("rotary_and_cache", &rillet::rotary_and_cache, nogil,
        "rotary embedding of q and k, in place, and the K/V cache write");
  m.def("silu_and_mul", &rillet::silu_and_mul, nogil, "SwiGLU activation");
  m.def("scaled_rms_norm", &rillet::scaled_rms_norm, nogil,
        "RMSNorm of each group of a row times an fp32 scale (Gemma's norms)");
  m.def("gelu_tanh_and_mul", &rillet::gelu_tanh_and_mul, nogil, "GeGLU activation");
  m.def("pack_bf16_weight", &rillet::pack_bf16_weight, "weight layout for bf16_linear");
  m.def("bf16_linear", &rillet::bf16_linear, nogil, "batched linear on packed bf16 weights");
  m.def("quantized_linear", &rillet::quantized_linear, nogil,
        "small-batch linear on 4- or 8-bit group-quantized weights");
  m.def("quantized_linear_supported", &rillet::quantized_linear_supported,
        "whether this build has the quantized linear kernel (needs AVX512-VNNI)");
  py::class_<rillet::DecoderStack>(m, "DecoderStack")
      .def(py::init<int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &rillet::DecoderStack::add_layer)
      .def("forward", &rillet::DecoderStack::forward, nogil,
           "a decode-only step through every layer and the final norm");
  py::class_<rillet::Gemma3DecoderStack>(m, "Gemma3DecoderStack")
      .def(py::init<int64_t, int64_t, double, double, at::Tensor>())
      .def("add_layer", &rillet::Gemma3DecoderStack::add_layer)
      .def("forward", &rillet::Gemma3DecoderStack::forward, nogil,
           "a decode-only step through every Gemma 3 layer and the final norm");
  m.def("bf16_linear_supported", &rillet::bf16_linear_supported,
        "whether this build has the bf16 linear kernel (needs AVX512-BF16)");
  m.def("apply_token_bitmask", &rillet::apply_token_bitmask, nogil,
        "grammar masks: the disallowed logits of some rows to -inf, in place");
  m.def("masked_argmax", &rillet::masked_argmax, nogil,
        "greedy choice under a grammar mask: argmax of some rows over their allowed tokens");
}
