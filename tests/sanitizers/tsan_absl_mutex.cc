// Makes absl::Mutex visible to ThreadSanitizer when Abseil itself was not built with it (Debian's
// libabsl_synchronization.so is not): preloaded into TSan test processes (LD_PRELOAD, see
// scripts/sanitizers.sh), it interposes the Mutex and CondVar entry points, forwards each to the
// real one and wraps it in the same __tsan_mutex_* annotations Abseil's own TSan build uses. So a
// lock/unlock is a happens-before edge for TSan, in our code and in gRPC's (gRPC 1.51 locks
// absl::Mutex too), and the conditions Abseil evaluates for a waiter on another thread run inside
// the annotated lock operation, where TSan ignores memory accesses. Without this every
// absl::Mutex-guarded access races in TSan's eyes.
//
// Built without TSan instrumentation and without libtsan: the annotation functions are weak, so
// in a process without TSan (an openssl run by a test inherits LD_PRELOAD) it only forwards.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

extern "C" {
void __tsan_mutex_create(void* addr, unsigned flags) __attribute__((weak));
void __tsan_mutex_destroy(void* addr, unsigned flags) __attribute__((weak));
void __tsan_mutex_pre_lock(void* addr, unsigned flags) __attribute__((weak));
void __tsan_mutex_post_lock(void* addr, unsigned flags, int recursion) __attribute__((weak));
int __tsan_mutex_pre_unlock(void* addr, unsigned flags) __attribute__((weak));
void __tsan_mutex_post_unlock(void* addr, unsigned flags) __attribute__((weak));
}

namespace {

// Flags of sanitizer/tsan_interface.h.
constexpr unsigned kReadLock = 1u << 3;
constexpr unsigned kTryLock = 1u << 4;
constexpr unsigned kTryLockFailed = 1u << 5;

// Annotate only the outermost interposed call of a thread: Abseil implements some entry points
// with others (LockWhenWithTimeout calls LockWhenWithDeadline through the PLT, so it lands here
// again), and the nested call must only forward.
thread_local int depth = 0;

bool Tsan() { return __tsan_mutex_pre_lock != nullptr && depth == 0; }

// Marks the real call in progress (nested interposed calls only forward).
struct Nested {
  Nested() { ++depth; }
  ~Nested() { --depth; }
};

void PreLock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_pre_lock(m, f);
}
void PostLock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_post_lock(m, f, 0);
}
void PreUnlock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_pre_unlock(m, f);
}
void PostUnlock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_post_unlock(m, f);
}

// Whether `pc` is code of the main executable (our instrumented code) rather than of a shared
// library (gRPC, Abseil, ...).
bool CalledFromExecutable(void* pc) {
  Dl_info info;
  if (dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return false;
  const std::string_view file(info.dli_fname);
  return file.find(".so") == std::string_view::npos;
}

// The real definition of `symbol` in the next object (libabsl_synchronization.so).
template <typename Fn>
Fn Real(const char* symbol) {
  void* p = dlsym(RTLD_NEXT, symbol);
  if (p == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: %s not found: %s\n", symbol, dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

// An Itanium-ABI member function called as a free function with `this` first.
#define KVB_REAL(type, name, mangled) static const auto name = Real<type>(mangled)

using MuFn = void (*)(absl::Mutex*);
using MuBoolFn = bool (*)(absl::Mutex*);
using MuCondFn = void (*)(absl::Mutex*, const absl::Condition&);
using MuCondDurFn = bool (*)(absl::Mutex*, const absl::Condition&, absl::Duration);
using MuCondTimeFn = bool (*)(absl::Mutex*, const absl::Condition&, absl::Time);
using CvFn = void (*)(absl::CondVar*, absl::Mutex*);
using CvDurFn = bool (*)(absl::CondVar*, absl::Mutex*, absl::Duration);
using CvTimeFn = bool (*)(absl::CondVar*, absl::Mutex*, absl::Time);

// Releases `mu` (held in mode `f`) around a real call that blocks and returns with it held again;
// accesses inside (conditions evaluated by Abseil) are ignored.
template <typename Call>
auto AroundWait(absl::Mutex* mu, unsigned f, Call call) {
  PreUnlock(mu, f);
  auto r = [&] {
    Nested n;
    return call();
  }();
  PostUnlock(mu, f);
  PreLock(mu, f);
  PostLock(mu, f);
  return r;
}

// Whether `mu` is held for reading only (Abseil's own test, on its state word).
unsigned HeldMode(absl::Mutex* mu) {
  // The writer bit of Abseil's mu_ word (kMuWriter = 0x0008); readers never set it.
  const intptr_t v = *reinterpret_cast<const volatile intptr_t*>(mu);
  return (v & 0x0008) != 0 ? 0u : kReadLock;
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  KVB_REAL(MuFn, real, "_ZN4absl7debian35MutexD2Ev");
  // Only a mutex of ours (destroyed by code in the executable) is marked destroyed: gRPC frees its
  // own objects after hand-offs TSan cannot see, and a destroy mark there reads as a race.
  if (Tsan() && CalledFromExecutable(__builtin_return_address(0))) {
    __tsan_mutex_destroy(this, 0);
  }
  Nested n;
  real(this);
}

void Mutex::Lock() {
  KVB_REAL(MuFn, real, "_ZN4absl7debian35Mutex4LockEv");
  PreLock(this, 0);
  {
    Nested n;
    real(this);
  }
  PostLock(this, 0);
}

void Mutex::ReaderLock() {
  KVB_REAL(MuFn, real, "_ZN4absl7debian35Mutex10ReaderLockEv");
  PreLock(this, kReadLock);
  {
    Nested n;
    real(this);
  }
  PostLock(this, kReadLock);
}

bool Mutex::TryLock() {
  KVB_REAL(MuBoolFn, real, "_ZN4absl7debian35Mutex7TryLockEv");
  PreLock(this, kTryLock);
  bool ok;
  {
    Nested n;
    ok = real(this);
  }
  PostLock(this, ok ? kTryLock : kTryLock | kTryLockFailed);
  return ok;
}

bool Mutex::ReaderTryLock() {
  KVB_REAL(MuBoolFn, real, "_ZN4absl7debian35Mutex13ReaderTryLockEv");
  PreLock(this, kReadLock | kTryLock);
  bool ok;
  {
    Nested n;
    ok = real(this);
  }
  PostLock(this, ok ? kReadLock | kTryLock : kReadLock | kTryLock | kTryLockFailed);
  return ok;
}

void Mutex::Unlock() {
  KVB_REAL(MuFn, real, "_ZN4absl7debian35Mutex6UnlockEv");
  PreUnlock(this, 0);
  {
    Nested n;
    real(this);
  }
  PostUnlock(this, 0);
}

void Mutex::ReaderUnlock() {
  KVB_REAL(MuFn, real, "_ZN4absl7debian35Mutex12ReaderUnlockEv");
  PreUnlock(this, kReadLock);
  {
    Nested n;
    real(this);
  }
  PostUnlock(this, kReadLock);
}

void Mutex::LockWhen(const Condition& cond) {
  KVB_REAL(MuCondFn, real, "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  PreLock(this, 0);
  {
    Nested n;
    real(this, cond);
  }
  PostLock(this, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  KVB_REAL(MuCondFn, real, "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE");
  PreLock(this, kReadLock);
  {
    Nested n;
    real(this, cond);
  }
  PostLock(this, kReadLock);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  KVB_REAL(MuCondDurFn, real,
           "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  PreLock(this, 0);
  bool r;
  {
    Nested n;
    r = real(this, cond, timeout);
  }
  PostLock(this, 0);
  return r;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  KVB_REAL(MuCondTimeFn, real,
           "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  PreLock(this, 0);
  bool r;
  {
    Nested n;
    r = real(this, cond, deadline);
  }
  PostLock(this, 0);
  return r;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  KVB_REAL(MuCondDurFn, real,
           "_ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  PreLock(this, kReadLock);
  bool r;
  {
    Nested n;
    r = real(this, cond, timeout);
  }
  PostLock(this, kReadLock);
  return r;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  KVB_REAL(MuCondTimeFn, real,
           "_ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  PreLock(this, kReadLock);
  bool r;
  {
    Nested n;
    r = real(this, cond, deadline);
  }
  PostLock(this, kReadLock);
  return r;
}

void Mutex::Await(const Condition& cond) {
  KVB_REAL(MuCondFn, real, "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  AroundWait(this, HeldMode(this), [&] {
    real(this, cond);
    return true;
  });
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  KVB_REAL(MuCondDurFn, real,
           "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return AroundWait(this, HeldMode(this), [&] { return real(this, cond, timeout); });
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  KVB_REAL(MuCondTimeFn, real,
           "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return AroundWait(this, HeldMode(this), [&] { return real(this, cond, deadline); });
}

void CondVar::Wait(Mutex* mu) {
  KVB_REAL(CvFn, real, "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  AroundWait(mu, HeldMode(mu), [&] {
    real(this, mu);
    return true;
  });
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  KVB_REAL(CvDurFn, real, "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  return AroundWait(mu, HeldMode(mu), [&] { return real(this, mu, timeout); });
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  KVB_REAL(CvTimeFn, real, "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  return AroundWait(mu, HeldMode(mu), [&] { return real(this, mu, deadline); });
}

ABSL_NAMESPACE_END
}  // namespace absl
