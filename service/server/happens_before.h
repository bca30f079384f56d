// Orderings that gRPC guarantees but ThreadSanitizer cannot see, because gRPC is not built with
// it: HappensBefore(p) on one thread and HappensAfter(p) on another make TSan treat everything
// before the first as happening before everything after the second. Used only where gRPC's
// contract promises that order. No-ops outside TSan builds.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define KVB_HAVE_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVB_HAVE_TSAN 1
#endif
#endif

#ifdef KVB_HAVE_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace kvbuffer::server {

// What this thread did so far happens before any later HappensAfter(p).
inline void HappensBefore(const void* p) {
#ifdef KVB_HAVE_TSAN
  __tsan_release(const_cast<void*>(p));
#else
  (void)p;
#endif
}

// What this thread does from now on happens after every earlier HappensBefore(p).
inline void HappensAfter(const void* p) {
#ifdef KVB_HAVE_TSAN
  __tsan_acquire(const_cast<void*>(p));
#else
  (void)p;
#endif
}

}  // namespace kvbuffer::server
