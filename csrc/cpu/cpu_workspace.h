// CPU-only: a scratch-memory cache for the C++ kernels.
//
// The forward of sa_hdn needs a few arrays as large as the input for the length of one
// call. Fresh large allocations come from mmap, and the kernel then pays a page fault
// (and the zeroing of a page) for every 4 KiB it touches, which costs about as much as
// the kernel's own work. The cache keeps the largest block released so far (one block
// per process) and hands it out again; a call that finds it busy or too small allocates
// its own. Set WESTAR_CPU_WORKSPACE_CACHE=0 to free every block at the end of its call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace westar {
namespace cpu {

inline void advise_huge_pages(void* ptr, size_t bytes);

// Big output blocks are 2 MiB-aligned and advised for transparent huge pages once, when
// they are allocated: writes to them miss the TLB far less, and a reused block keeps its
// huge pages.
constexpr size_t kHugePage = size_t(2) << 20;

inline size_t block_alignment(size_t bytes) { return bytes >= 2 * kHugePage ? kHugePage : 64; }

inline void* allocate_block(size_t bytes) {
  void* p = ::operator new(bytes, std::align_val_t(block_alignment(bytes)));
  advise_huge_pages(p, bytes);
  return p;
}

inline void free_block(void* p, size_t bytes) { ::operator delete(p, std::align_val_t(block_alignment(bytes))); }

// WESTAR_CPU_WORKSPACE_CACHE=0 in the environment: free every block at the end of its
// use instead of keeping it for the next call (read once per process).
inline bool caches_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("WESTAR_CPU_WORKSPACE_CACHE");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return enabled;
}

class Workspace {
 public:
  static constexpr size_t kAlign = 64;

  explicit Workspace(size_t bytes) : size_(bytes) {
    if (bytes == 0) return;
    Cache& c = cache();
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      if (c.ptr != nullptr && c.size >= bytes) {
        ptr_ = c.ptr;
        size_ = c.size;
        c.ptr = nullptr;
        c.size = 0;
      }
    }
    // Scratch stays on small pages: it is sized for the worst case and touched sparsely
    // (candidate blocks), and huge pages would commit all of it.
    if (ptr_ == nullptr) ptr_ = ::operator new(bytes, std::align_val_t(kAlign));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  ~Workspace() {
    if (ptr_ == nullptr) return;
    Cache& c = cache();
    void* to_free = ptr_;
    if (caches_enabled()) {
      std::lock_guard<std::mutex> lock(c.mutex);
      if (c.size < size_) {
        to_free = c.ptr;  // keep the larger block
        c.ptr = ptr_;
        c.size = size_;
      }
    }
    if (to_free != nullptr) ::operator delete(to_free, std::align_val_t(kAlign));
  }

  // Carves consecutive, aligned arrays out of the block (call with the sizes that
  // were counted by bytes_for, in the same order).
  template <typename T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(static_cast<char*>(ptr_) + offset_);
    offset_ += round_up(count * sizeof(T));
    return p;
  }

  template <typename T>
  static size_t bytes_for(size_t count) {
    return round_up(count * sizeof(T));
  }

 private:
  struct Cache {
    std::mutex mutex;
    void* ptr = nullptr;
    size_t size = 0;
  };
  static Cache& cache() {
    static Cache* c = new Cache;  // never destroyed: no ordering issue at exit
    return *c;
  }
  static size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  void* ptr_ = nullptr;
  size_t size_ = 0;
  size_t offset_ = 0;
};

// A few freed output blocks, handed out again to later outputs of about the same size.
// The big outputs of the CPU kernels (seg in the forward, the gradient in the backward)
// are as large as the input; memory freshly mapped from the OS costs a fault and the
// zeroing of every page on first touch, on every call. At most kMaxBlocks blocks
// (kMaxBytes in all) are kept; WESTAR_CPU_WORKSPACE_CACHE=0 keeps none.
class OutputPool {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller outputs: plain allocations
  static constexpr size_t kMaxBlocks = 4;
  static constexpr size_t kMaxBytes = size_t(512) << 20;

  // A block of at least `bytes` bytes (*size: its real size), from the pool when one fits
  // without wasting more than half of it.
  static void* take(size_t bytes, size_t* size) {
    State& st = state();
    {
      std::lock_guard<std::mutex> lock(st.mutex);
      size_t best = st.count;
      for (size_t i = 0; i < st.count; ++i) {
        const bool fits = st.size[i] >= bytes && st.size[i] <= 2 * bytes;
        if (fits && (best == st.count || st.size[i] < st.size[best])) best = i;
      }
      if (best < st.count) {
        void* p = st.ptr[best];
        *size = st.size[best];
        st.total -= st.size[best];
        st.ptr[best] = st.ptr[st.count - 1];
        st.size[best] = st.size[st.count - 1];
        --st.count;
        return p;
      }
    }
    *size = bytes;
    return allocate_block(bytes);
  }

  static void give(void* p, size_t size) {
    State& st = state();
    if (caches_enabled()) {
      std::lock_guard<std::mutex> lock(st.mutex);
      if (st.count < kMaxBlocks && st.total + size <= kMaxBytes) {
        st.ptr[st.count] = p;
        st.size[st.count] = size;
        st.total += size;
        ++st.count;
        return;
      }
    }
    free_block(p, size);
  }

 private:
  struct State {
    std::mutex mutex;
    void* ptr[kMaxBlocks] = {};
    size_t size[kMaxBlocks] = {};
    size_t count = 0;
    size_t total = 0;
  };
  static State& state() {
    static State* s = new State;  // never destroyed: no ordering issue at exit
    return *s;
  }
};

// Asks Linux for transparent huge pages on the 2 MiB-aligned part of [ptr, ptr + bytes)
// before it is first touched: a fresh output of several MiB then costs a few page
// faults instead of thousands. A hint only; nothing changes where THP is off.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// An uninitialized contiguous CPU tensor for a kernel's output; big ones come from the
// OutputPool and go back to it when the tensor is freed.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < OutputPool::kMinBytes) return at::empty(sizes, options);
  size_t size = 0;
  void* p = OutputPool::take(bytes, &size);
  return at::from_blob(p, sizes, [size](void* q) { OutputPool::give(q, size); }, options);
}

}  // namespace cpu
}  // namespace westar
