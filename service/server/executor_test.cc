#include "service/server/executor.h"

#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace kvbuffer::server {
namespace {

TEST(ExecutorTest, RunsEveryTaskOnItsOwnThreads) {
  std::atomic<int> ran{0};
  absl::Mutex mu;
  std::set<std::thread::id> threads;
  {
    Executor executor(3);
    EXPECT_EQ(executor.threads(), 3);
    for (int i = 0; i < 200; ++i) {
      executor.Schedule([&] {
        ran.fetch_add(1);
        absl::MutexLock lock(&mu);
        threads.insert(std::this_thread::get_id());
      });
    }
  }  // the destructor runs what is queued
  EXPECT_EQ(ran.load(), 200);
  EXPECT_EQ(threads.count(std::this_thread::get_id()), 0u);
  EXPECT_LE(threads.size(), 3u);
}

TEST(ExecutorTest, QueuedCountsTasksNotStarted) {
  // Declared before the executor, so that they outlive its threads (a worker may still be inside
  // release.WaitForNotification() when the test body ends).
  absl::Notification started, release;
  Executor executor(1);
  executor.Schedule([&] {
    started.Notify();
    release.WaitForNotification();
  });
  started.WaitForNotification();
  executor.Schedule([] {});
  executor.Schedule([] {});
  EXPECT_EQ(executor.queued(), 2);
  release.Notify();
}

}  // namespace
}  // namespace kvbuffer::server
