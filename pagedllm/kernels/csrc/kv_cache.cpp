// Writes new tokens' keys and values into the paged pools at their flat slots (block * block_size + offset).
#include "ops.h"
#include "vec.h"

#include <cstring>

namespace pagedllm {

void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pool, at::Tensor& v_pool,
               const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "write_kv_: k and v [tokens, kv_heads, head_dim]");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.sizes() == v_pool.sizes(),
              "write_kv_: contiguous pools of one shape");
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == v_pool.scalar_type(),
              "write_kv_: pools and entries must share a dtype");
  const int64_t tokens = k.size(0), entry = k.size(1) * k.size(2), bytes = entry * k.element_size();
  TORCH_CHECK(k_pool.size(2) * k_pool.size(3) == entry, "write_kv_: entries do not match the pools' heads");
  const int64_t num_slots = k_pool.size(0) * k_pool.size(1);
  const at::Tensor slot = slots.to(at::kLong).contiguous();
  const int64_t* sp = slot.const_data_ptr<int64_t>();
  const at::Tensor keys = heads_in_token_rows(k), values = heads_in_token_rows(v);
  const int64_t k_stride = keys.stride(0) * keys.element_size(), v_stride = values.stride(0) * values.element_size();
  auto* kp = static_cast<char*>(k_pool.data_ptr());
  auto* vp = static_cast<char*>(v_pool.data_ptr());
  const auto* kn = static_cast<const char*>(keys.const_data_ptr());
  const auto* vn = static_cast<const char*>(values.const_data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "write_kv_: slot ", sp[t], " outside the pool");
    std::memcpy(kp + sp[t] * bytes, kn + t * k_stride, bytes);
    std::memcpy(vp + sp[t] * bytes, vn + t * v_stride, bytes);
  }
}

}  // namespace pagedllm
