// Registers the CPU kernels as torch.ops.pagedllm.*.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(pagedllm, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale_min, int group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("gguf_linear(Tensor x, Tensor blocks, int ggml_type) -> Tensor");
  m.def("gguf_dequantize(Tensor blocks, int ggml_type, ScalarType dtype) -> Tensor");
  m.def("kquant_tiles(Tensor blocks, int ggml_type) -> Tensor");
  m.def("kquant_linear(Tensor x, Tensor tiles, int ggml_type) -> Tensor");
  m.def("kquant_dequantize(Tensor tiles, int ggml_type, ScalarType dtype) -> Tensor");
  m.def("q8_0_tiles_linear(Tensor x, Tensor tiles, Tensor scales, int out_features) -> Tensor");
  m.def("q8_0_tiles_dequantize(Tensor tiles, Tensor scales, int out_features, ScalarType dtype) -> Tensor");
  m.def("q8_0_tiles_rows(Tensor tiles, Tensor scales, int out_features, Tensor index, ScalarType dtype) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens, float scale, int sliding_window=0, int queries_per_kv=0, int query_offset=0) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int[] query_starts, int[] key_starts, int[] key_lens, float scale, int sliding_window=0, int queries_per_kv=0, int query_offset=0) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotate_heads_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, int rotated_heads) -> ()");
  m.def(
      "rms_norm_rotate_heads_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, Tensor query_weight, "
      "Tensor key_weight, float eps, int query_heads, int key_heads) -> ()");
  m.def("write_kv_(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots) -> ()");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh_and_mul(Tensor gate_up) -> Tensor");
  m.def("shared_memory_all_reduce_(Tensor(a!) x, Tensor segment, int rank, int world_size, float timeout_s) -> ()");
  m.def("shared_memory_all_gather(Tensor x, Tensor segment, int rank, int world_size, float timeout_s) -> Tensor");
  m.def(
      "fused_decode(Tensor hidden, Tensor positions, Tensor[] cos, Tensor[] sin, Tensor[] norms, "
      "Tensor[] weights, Tensor[] scales, int[] kinds, int[] kind_args, int[] parts, Tensor?[] biases, "
      "Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor[] slots, Tensor[] block_tables, Tensor[] seq_lens, "
      "int[] sliding_windows, str layer_type, int num_heads, int num_kv_heads, float eps, float scale, "
      "int dense_rows, int queries_per_kv=0, int query_offset=0, Tensor? segment=None, int rank=0, int world_size=1, float timeout_s=0) -> Tensor");
  m.def("fused_decode_weight_kinds() -> int[]", []() {
    return std::vector<int64_t>{pagedllm::kDense, pagedllm::kInt8, pagedllm::kInt4, pagedllm::kGGUF,
                                pagedllm::kKQuantTiles, pagedllm::kQ8_0Tiles};
  });
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) {
  m.impl("int4_linear", &pagedllm::int4_linear);
  m.impl("int8_linear", &pagedllm::int8_linear);
  m.impl("gguf_linear", &pagedllm::gguf_linear);
  m.impl("gguf_dequantize", &pagedllm::gguf_dequantize);
  m.impl("kquant_tiles", &pagedllm::kquant_tiles);
  m.impl("kquant_linear", &pagedllm::kquant_linear);
  m.impl("kquant_dequantize", &pagedllm::kquant_dequantize);
  m.impl("q8_0_tiles_linear", &pagedllm::q8_0_tiles_linear);
  m.impl("q8_0_tiles_dequantize", &pagedllm::q8_0_tiles_dequantize);
  m.impl("q8_0_tiles_rows", &pagedllm::q8_0_tiles_rows);
  m.impl("paged_decode_attention", &pagedllm::paged_decode_attention);
  m.impl("prefill_attention", &pagedllm::prefill_attention);
  m.impl("rms_norm", &pagedllm::rms_norm);
  m.impl("add_rms_norm_", &pagedllm::add_rms_norm_);
  m.impl("rotate_heads_", &pagedllm::rotate_heads_);
  m.impl("rms_norm_rotate_heads_", &pagedllm::rms_norm_rotate_heads_);
  m.impl("write_kv_", &pagedllm::write_kv_);
  m.impl("silu_and_mul", &pagedllm::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &pagedllm::gelu_tanh_and_mul);
  m.impl("shared_memory_all_reduce_", &pagedllm::shared_memory_all_reduce_);
  m.impl("shared_memory_all_gather", &pagedllm::shared_memory_all_gather);
  m.impl("fused_decode", &pagedllm::fused_decode);
}
