// CPU-only: a scratch-memory cache for the C++ kernels.
//
// The forward of sa_hdn needs a few arrays as large as the input for the length of one
// call. Fresh large allocations come from mmap, and the kernel then pays a page fault
// (and the zeroing of a page) for every 4 KiB it touches, which costs about as much as
// the kernel's own work. The cache keeps the largest block released so far (one block
// per process) and hands it out again; a call that finds it busy or too small allocates
// its own. Set WESTAR_CPU_WORKSPACE_CACHE=0 to free every block at the end of its call.
#pragma once

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
    if (ptr_ == nullptr) ptr_ = ::operator new(bytes, std::align_val_t(kAlign));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  ~Workspace() {
    if (ptr_ == nullptr) return;
    Cache& c = cache();
    void* to_free = ptr_;
    if (c.enabled) {
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
    bool enabled = true;
  };
  static Cache& cache() {
    static Cache* c = [] {
      Cache* made = new Cache;  // never destroyed: no ordering issue at exit
      const char* env = std::getenv("WESTAR_CPU_WORKSPACE_CACHE");
      made->enabled = !(env != nullptr && std::strcmp(env, "0") == 0);
      return made;
    }();
    return *c;
  }
  static size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  void* ptr_ = nullptr;
  size_t size_ = 0;
  size_t offset_ = 0;
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

}  // namespace cpu
}  // namespace westar
