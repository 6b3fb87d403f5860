// Idle threads of a sharded forward take work from the threads still running.
//
// Why: a BlockLoop splits the batch into shards that run side by side, one per thread,
// with no synchronisation until the end (block_loop.h, sharded()). The shards of a routed
// batch do different amounts of work (their samples take different blocks), and a thread
// can be slowed by the machine's other tenants; the thread that finishes first then waits
// at the end for the other. With a HelpDesk, a thread that has run out of shards takes
// chunks of the parallel kernels the others are still running (run_units: the Winograd
// convolution's tile groups), so the last shard finishes sooner.
//
// Results do not change: a unit computes the same values whichever thread runs it, and
// every unit writes its own part of the output.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

namespace dynexec {
namespace cpu {

class HelpDesk {
 public:
  // workers: the threads that will run shards (each enters with a WorkerScope).
  explicit HelpDesk(int64_t workers);

  struct Job;
  struct Slot {
    std::mutex mu;
    Job* job = nullptr;
  };

 private:
  friend class WorkerScope;
  // Runs the chunks the other workers post until every worker has left its shards
  // (WorkerScope::finish_and_help or WorkerScope's destructor).
  void help_until_all_done();

  std::vector<std::unique_ptr<Slot>> slots_;
  std::atomic<int64_t> next_slot_{0};
  std::atomic<int64_t> working_;
};

// Makes `desk` the current thread's desk for its lifetime: run_units posts this thread's
// kernels there. Its destructor counts the worker as done with its shards (also when a
// shard threw), so the helpers never wait for a worker that has left.
class WorkerScope {
 public:
  explicit WorkerScope(HelpDesk& desk);
  ~WorkerScope();
  // The worker has run out of shards: it is done (once), and helps until all are.
  void finish_and_help();
  WorkerScope(const WorkerScope&) = delete;
  WorkerScope& operator=(const WorkerScope&) = delete;

 private:
  HelpDesk& desk_;
  bool done_ = false;
};

// Runs body(lo, hi) over [0, total) in chunks of at most `chunk` units. On a thread with a
// desk (inside a WorkerScope) idle workers may run some of the chunks; the call returns
// when every chunk has run. Elsewhere it is body(0, total) on this thread.
// If body throws (on this thread or a helper), the first exception is rethrown here once
// every chunk a helper claimed has finished. body must not call run_units.
void run_units(int64_t total, int64_t chunk, const std::function<void(int64_t, int64_t)>& body);

// True inside a WorkerScope (a sharded forward's worker).
bool has_help_desk();

}  // namespace cpu
}  // namespace dynexec
