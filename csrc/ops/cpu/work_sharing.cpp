// HelpDesk and run_units (see work_sharing.h).
#include "work_sharing.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace dynexec {
namespace cpu {

// A kernel's chunks, claimed by fetch_add on next. The owner keeps it alive (on its stack)
// until the chunks helpers claimed (counted under the slot's lock) have all run.
struct HelpDesk::Job {
  const std::function<void(int64_t, int64_t)>* body;
  int64_t total, chunk;
  std::atomic<int64_t> next{0};
  int64_t helper_claimed = 0;          // chunks; under the slot's lock
  std::atomic<int64_t> helper_done{0};  // chunks
  std::exception_ptr helper_error;      // under the slot's lock
};

namespace {

// One wait step: a pause for the first spins, then giving the core away, so that a
// waiting thread does not hold up the one it waits for when they share a core (more
// threads than cores, or a host that has taken a core away).
void wait_step(int64_t& spins) {
  if (++spins < 2000) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

thread_local HelpDesk::Slot* tl_slot = nullptr;  // the calling worker's, inside a WorkerScope

void run_chunk(const HelpDesk::Job& job, int64_t lo) { (*job.body)(lo, std::min(lo + job.chunk, job.total)); }

}  // namespace

HelpDesk::HelpDesk(int64_t workers) : working_(workers) {
  TORCH_CHECK(workers >= 1, "HelpDesk: expected at least one worker, got ", workers);
  slots_.reserve(workers);
  for (int64_t i = 0; i < workers; ++i) slots_.push_back(std::make_unique<Slot>());
}

void HelpDesk::help_until_all_done() {
  int64_t spins = 0;
  while (working_.load(std::memory_order_acquire) > 0) {
    bool ran = false;
    for (auto& slot : slots_) {
      Job* job = nullptr;
      int64_t lo = 0;
      {
        // Under the slot's lock the owner cannot take its job down, so the claim is safe.
        std::lock_guard<std::mutex> lock(slot->mu);
        if (slot->job == nullptr) continue;
        lo = slot->job->next.fetch_add(slot->job->chunk, std::memory_order_relaxed);
        if (lo >= slot->job->total) continue;
        job = slot->job;
        ++job->helper_claimed;
      }
      try {
        run_chunk(*job, lo);
      } catch (...) {  // handed to the owner, which rethrows it
        std::lock_guard<std::mutex> lock(slot->mu);
        if (!job->helper_error) job->helper_error = std::current_exception();
      }
      // the last access to job: the owner may return right after it
      job->helper_done.fetch_add(1, std::memory_order_release);
      ran = true;
    }
    if (ran) {
      spins = 0;
    } else {
      wait_step(spins);
    }
  }
}

WorkerScope::WorkerScope(HelpDesk& desk) : desk_(desk) {
  const int64_t slot = desk.next_slot_.fetch_add(1);
  TORCH_CHECK(slot < static_cast<int64_t>(desk.slots_.size()), "HelpDesk: more workers than the ",
              desk.slots_.size(), " it was made for");
  TORCH_CHECK(tl_slot == nullptr, "HelpDesk: a worker cannot join a second desk");
  tl_slot = desk.slots_[slot].get();
}

void WorkerScope::finish_and_help() {
  if (!done_) {
    done_ = true;
    desk_.working_.fetch_sub(1, std::memory_order_acq_rel);
  }
  desk_.help_until_all_done();
}

WorkerScope::~WorkerScope() {
  if (!done_) desk_.working_.fetch_sub(1, std::memory_order_acq_rel);
  tl_slot = nullptr;
}

bool has_help_desk() { return tl_slot != nullptr; }

namespace {

// Takes the job down from the slot (no new claims) and waits for the chunks helpers
// claimed before that; also when the owner's own chunk threw.
class PostedJob {
 public:
  PostedJob(HelpDesk::Slot& slot, HelpDesk::Job& job) : slot_(slot), job_(job) {
    std::lock_guard<std::mutex> lock(slot_.mu);
    slot_.job = &job_;
  }
  ~PostedJob() {
    int64_t claimed;
    {
      std::lock_guard<std::mutex> lock(slot_.mu);
      slot_.job = nullptr;
      claimed = job_.helper_claimed;
    }
    int64_t spins = 0;
    while (job_.helper_done.load(std::memory_order_acquire) < claimed) wait_step(spins);
  }
  PostedJob(const PostedJob&) = delete;
  PostedJob& operator=(const PostedJob&) = delete;

 private:
  HelpDesk::Slot& slot_;
  HelpDesk::Job& job_;
};

}  // namespace

void run_units(int64_t total, int64_t chunk, const std::function<void(int64_t, int64_t)>& body) {
  if (total <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  HelpDesk::Slot* slot = tl_slot;
  if (slot == nullptr || total <= chunk) {
    body(0, total);
    return;
  }
  HelpDesk::Job job;
  job.body = &body;
  job.total = total;
  job.chunk = chunk;
  {
    PostedJob posted(*slot, job);
    for (;;) {
      const int64_t lo = job.next.fetch_add(chunk, std::memory_order_relaxed);
      if (lo >= total) break;
      run_chunk(job, lo);
    }
  }
  if (job.helper_error) std::rethrow_exception(job.helper_error);
}

}  // namespace cpu
}  // namespace dynexec
