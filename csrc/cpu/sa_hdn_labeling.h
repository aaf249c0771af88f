// Phase 1 of the CPU sa_hdn forward (sa_hdn_forward_cpu.cpp): the usable-pixel mask and
// the labeling of every (level, image) plane into runs of equal ids, with ids > 0
// compacted to plane-local slots through a hash table, so that the cost never depends on
// how large or sparse the ids are.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_avx512.h"
#include "westar/op_checks.h"

namespace westar {
// Internal linkage, as in the one translation unit that includes this header
// (sa_hdn_forward_cpu.cpp): the compiler may inline and specialise freely.
namespace {

// ------------------------------------------------------------------ id compaction

// Open-addressing hash map from id (> 0) to a plane-local slot number.
class IdTable {
 public:
  IdTable() { rehash(64); }

  // Slot of `id`, inserting it (with the next slot number) when new.
  int32_t slot(int64_t id, std::vector<int64_t>& ids_by_slot) {
    uint64_t h = hash(id) & mask_;
    for (;;) {
      const int64_t k = keys_[h];
      if (k == id) return vals_[h];
      if (k == kEmpty) break;
      h = (h + 1) & mask_;
    }
    const int32_t s = static_cast<int32_t>(ids_by_slot.size());
    ids_by_slot.push_back(id);
    keys_[h] = id;
    vals_[h] = s;
    if (static_cast<uint64_t>(ids_by_slot.size()) * 2 > mask_ + 1) grow(ids_by_slot);
    return s;
  }

 private:
  static constexpr int64_t kEmpty = -1;
  static uint64_t hash(int64_t id) {
    uint64_t x = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
  }
  void rehash(uint64_t capacity) {
    keys_.assign(capacity, kEmpty);
    vals_.assign(capacity, 0);
    mask_ = capacity - 1;
  }
  void grow(const std::vector<int64_t>& ids_by_slot) {
    rehash((mask_ + 1) * 2);
    for (size_t s = 0; s < ids_by_slot.size(); ++s) {
      uint64_t h = hash(ids_by_slot[s]) & mask_;
      while (keys_[h] != kEmpty) h = (h + 1) & mask_;
      keys_[h] = ids_by_slot[s];
      vals_[h] = static_cast<int32_t>(s);
    }
  }
  std::vector<int64_t> keys_;
  std::vector<int32_t> vals_;
  uint64_t mask_ = 0;
};

// A maximal run of pixels [start, start + len) of a plane with the same id (slot -1:
// id 0, or a level's pixels of no instance).
struct Run {
  int64_t start;
  int64_t len;
  int32_t slot;
  int64_t seg_pos = -1;  // where its usable pixels start in the segment arrays (scatter)
};

// One (level, image) plane.
struct Plane {
  std::vector<Run> runs;           // the plane in runs, in pixel order
  std::vector<int32_t> runs_by_k;  // indices of the runs of each context, grouped by k
  std::vector<int64_t> runs_by_k_off;  // context first_k + i: runs_by_k[off[i], off[i + 1])
  std::vector<int64_t> ids;        // slot -> id
  std::vector<int64_t> counts;     // slot -> usable pixels
  std::vector<int32_t> slot_to_k;  // slot -> context number, or -1 (skipped)
  int64_t first_k = 0;
  int64_t num_k = 0;
  int64_t negative_pixel = -1;  // first pixel with a negative id, if any
  int64_t large_pixel = -1;     // first pixel with an id >= kIdLimit (2^31), if any
};

// usable[j] = 1 where valid (when given) and the target is finite, else 0, for one image;
// returns the number of usable pixels. |x| <= max is false for NaN and +-inf, and unlike
// std::isfinite it vectorizes; valid is read as bytes (GCC does not vectorize bool loads).
template <typename acc_t>
int64_t mark_usable(const bool* valid, const acc_t* q, int64_t hw, uint8_t* usable) {
  int64_t count = 0;
  if (valid == nullptr) {
    for (int64_t j = 0; j < hw; ++j) {
      const uint8_t u = std::abs(q[j]) <= std::numeric_limits<acc_t>::max();
      usable[j] = u;
      count += u;
    }
  } else {
    const uint8_t* v = reinterpret_cast<const uint8_t*>(valid);
    for (int64_t j = 0; j < hw; ++j) {
      const uint8_t u = (v[j] != 0) & (std::abs(q[j]) <= std::numeric_limits<acc_t>::max());
      usable[j] = u;
      count += u;
    }
  }
  return count;
}

inline int64_t count_usable(const uint8_t* usable, int64_t n) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += usable[j];
  return count;
}

// Global level: one run over the image, slot 0 holding every usable pixel.
inline void label_global(int64_t hw, int64_t usable_count, Plane& plane) {
  if (usable_count > 0) {
    plane.ids.push_back(1);
    plane.counts.push_back(usable_count);
  }
  plane.runs.push_back({0, hw, usable_count > 0 ? 0 : -1});
}

// Instance level: the row-major scan is cut into runs of equal ids; the hash table gives
// each id > 0 a slot (in order of first appearance) once per run, and the run adds its
// usable pixels to the slot's count. Only ids and the usable mask are read.
template <typename id_t>
void label_instances(const id_t* ids, const uint8_t* usable, int64_t hw, Plane& plane, bool avx512) {
  IdTable table;
  int64_t j = 0;
  while (j < hw) {
    const id_t id = ids[j];
    int64_t end = j + 1;
#if WESTAR_HAVE_AVX512_PATHS
    if constexpr (std::is_same_v<id_t, int32_t>) {
      if (avx512) end = cpu::run_end_avx512(ids, j, hw);
    }
#endif
    while (end < hw && ids[end] == id) ++end;
    const int64_t id64 = static_cast<int64_t>(id);
    int32_t slot = -1;
    if (id64 >= kIdLimit) {  // raised after labeling, as on the GPU backends
      if (plane.large_pixel < 0) plane.large_pixel = j;
    } else if (id64 > 0) {
      slot = table.slot(id64, plane.ids);
      if (plane.counts.size() < plane.ids.size()) plane.counts.push_back(0);
      plane.counts[slot] += count_usable(usable + j, end - j);
    } else if (id64 < 0 && plane.negative_pixel < 0) {
      plane.negative_pixel = j;
    }
    plane.runs.push_back({j, end - j, slot});
    j = end;
  }
}

}  // namespace
}  // namespace westar
