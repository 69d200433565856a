// Splitting a kernel's activation rows into tiles whose row count is a compile-time constant.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace pagedllm {

// Calls tile(rows, m) for tiles of MaxTile rows from row 0, then once for the rest as one tile; `rows` is an
// std::integral_constant, so each tile size is an instantiation of its own. A verification's few rows thus meet
// each weight once. The kernels that use it give a row the same result whatever its tile.
template <int64_t MaxTile, typename TileFn>
void for_row_tiles(int64_t num_rows, const TileFn& tile) {
  int64_t m = 0;
  for (; num_rows - m >= MaxTile; m += MaxTile) tile(std::integral_constant<int64_t, MaxTile>{}, m);
  [&]<int64_t... R>(std::integer_sequence<int64_t, R...>) {
    ((num_rows - m == R + 1 ? tile(std::integral_constant<int64_t, R + 1>{}, m) : void()), ...);
  }(std::make_integer_sequence<int64_t, MaxTile - 1>{});
}

}  // namespace pagedllm
