//! A team of threads that runs one closure on every kernel thread at once, each taking its
//! share of every operation, with a spinning barrier between operations.
//!
//! This is how llama.cpp runs a decode step (`ggml_graph_compute` over a thread pool whose
//! threads meet at a barrier after each node): a decode step is hundreds of small
//! operations, and handing each to a pool as a separate job costs a wake-up per job, which
//! at these sizes costs as much as the work. A team is woken once per step and stays hot.
//!
//! Threads write their shares into shared buffers through [`SharedMut`]; a barrier
//! ([`Team::sync`]) separates a phase's writes from the next phase's reads.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One thread's view of its team: which member it is, how many there are, and the barrier.
pub struct Team<'a> {
    index: usize,
    size: usize,
    barrier: &'a SpinBarrier,
}

impl Team<'_> {
    /// This thread's index, `0..size`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Threads in the team.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Waits until every thread of the team has reached this point.
    pub fn sync(&self) {
        self.barrier.wait();
    }

    /// This thread's contiguous share of `0..n`, in whole multiples of `align` (but the last).
    pub fn share(&self, n: usize, align: usize) -> Range<usize> {
        let align = align.max(1);
        let units = n.div_ceil(align);
        let per = units.div_ceil(self.size);
        let start = (self.index * per * align).min(n);
        let end = ((self.index + 1) * per * align).min(n);
        start..end
    }

    /// This thread's contiguous share of the items `0..costs.len()`: an item goes to the
    /// thread whose equal part of the total cost holds its middle (attention over rows of
    /// unequal lengths, split by count, would leave one thread waiting at the next barrier).
    pub fn share_by_cost(&self, costs: &[usize]) -> Range<usize> {
        let total: usize = costs.iter().sum();
        let cut = |t: usize| -> usize {
            if t == 0 {
                return 0;
            }
            if t >= self.size {
                return costs.len();
            }
            let bound = (t * total).div_ceil(self.size);
            let mut before = 0;
            costs
                .iter()
                .position(|&c| {
                    let reached = 2 * before + c >= 2 * bound;
                    before += c;
                    reached
                })
                .unwrap_or(costs.len())
        };
        cut(self.index)..cut(self.index + 1)
    }
}

/// Threads in a team that [`run`] starts here.
pub fn size() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` once on each of rayon's threads at the same time and returns when all are done.
/// `f` must reach the same [`Team::sync`] calls on every thread. A panic on one thread
/// releases the others from their barriers and is raised again here.
pub fn run(f: impl Fn(&Team) + Sync) {
    let size = size();
    let barrier = SpinBarrier::new(size);
    let panics: Vec<_> = rayon::broadcast(|ctx| {
        let team = Team {
            index: ctx.index(),
            size,
            barrier: &barrier,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&team)))
            .inspect_err(|_| barrier.poisoned.store(true, Ordering::Release))
            .err()
    });
    // The first panic is the cause; the others are threads let out of a barrier.
    if let Some(payload) = panics.into_iter().flatten().next() {
        std::panic::resume_unwind(payload);
    }
}

/// A reusable barrier that spins (then yields) instead of sleeping: its threads meet every
/// few microseconds.
struct SpinBarrier {
    size: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// Set when a thread of the team panicked: it will never arrive.
    poisoned: AtomicBool,
}

impl SpinBarrier {
    fn new(size: usize) -> Self {
        Self {
            size,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.size {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if self.poisoned.load(Ordering::Acquire) {
                panic!("another thread of the team panicked");
            }
            if spins < SPINS_BEFORE_YIELD {
                std::hint::spin_loop();
                spins += 1;
            } else {
                // Another process has the core: let it run rather than burn the slice.
                std::thread::yield_now();
            }
        }
    }
}

/// Spins of a waiting thread before it starts yielding its core (about 10-50 us).
const SPINS_BEFORE_YIELD: u32 = 20_000;

/// A buffer the threads of a team write in disjoint pieces and read after a barrier.
pub struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _buffer: PhantomData<&'a mut [T]>,
}

// SAFETY: the buffer is only reached through the unsafe methods below, whose callers promise
// that no two threads touch the same element between two barriers unless both only read.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    /// Shares `buffer` for as long as the view lives.
    pub fn new(buffer: &'a mut [T]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            _buffer: PhantomData,
        }
    }

    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements of `range`, to write.
    ///
    /// # Safety
    /// No other thread may read or write these elements until the next barrier.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }

    /// The elements of `range`, to read.
    ///
    /// # Safety
    /// No thread may write these elements until the next barrier.
    pub unsafe fn slice(&self, range: Range<usize>) -> &[T] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(range.start), range.end - range.start)
    }

    /// The whole buffer, to read.
    ///
    /// # Safety
    /// No thread may write the buffer until the next barrier.
    pub unsafe fn get(&self) -> &[T] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_range_once_in_aligned_pieces() {
        let barrier = SpinBarrier::new(3);
        for &(n, align) in &[(0, 16), (1, 16), (100, 16), (960, 16), (7, 1), (49152, 32)] {
            let mut next = 0;
            for index in 0..3 {
                let team = Team {
                    index,
                    size: 3,
                    barrier: &barrier,
                };
                let r = team.share(n, align);
                assert_eq!(r.start, next.min(n), "n={n} align={align} thread {index}");
                assert!(r.start == r.end || r.start.is_multiple_of(align));
                next = r.end.max(next);
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn shares_by_cost_cover_the_items_once_and_balance_them() {
        let barrier = SpinBarrier::new(2);
        let team = |index| Team {
            index,
            size: 2,
            barrier: &barrier,
        };
        // One long row among short ones: it goes alone to one thread.
        let costs = [1, 1, 1, 100, 1, 1];
        assert_eq!(team(0).share_by_cost(&costs), 0..3);
        assert_eq!(team(1).share_by_cost(&costs), 3..6);
        for costs in [
            &[][..],
            &[0, 0, 0],
            &[5],
            &[3, 3, 3, 3],
            &[10, 1, 1, 1, 1, 10],
        ] {
            let (a, b) = (team(0).share_by_cost(costs), team(1).share_by_cost(costs));
            assert_eq!(
                (a.start, a.end, b.end),
                (0, b.start, costs.len()),
                "{costs:?}"
            );
        }
        let even = [3, 3, 3, 3];
        assert_eq!(team(0).share_by_cost(&even), 0..2);
    }

    #[test]
    fn phases_see_every_write_of_the_phase_before() {
        // Each thread writes its share, then after the barrier sums everything: every thread
        // must see every other's writes, over many rounds.
        let size = rayon::current_num_threads();
        let mut buffer = vec![0u64; 64 * size];
        let totals: Vec<AtomicUsize> = (0..size).map(|_| AtomicUsize::new(0)).collect();
        {
            let shared = SharedMut::new(&mut buffer);
            run(|team| {
                for round in 1..=200u64 {
                    let mine = team.share(shared.len(), 64);
                    // SAFETY: each thread writes its own share only, then meets the others.
                    unsafe { shared.slice_mut(mine.clone()) }.fill(round);
                    team.sync();
                    // SAFETY: nobody writes until the next barrier.
                    let sum: u64 = unsafe { shared.get() }.iter().sum();
                    assert_eq!(sum, round * shared.len() as u64);
                    team.sync();
                }
                totals[team.index()].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(totals.iter().all(|t| t.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panic_on_one_thread_reaches_the_caller_instead_of_hanging_the_team() {
        let caught = std::panic::catch_unwind(|| {
            run(|team| {
                team.sync();
                if team.index() == 0 {
                    panic!("first thread fails");
                }
                team.sync();
            })
        });
        let payload = caught.expect_err("the panic comes back");
        let text = payload.downcast_ref::<&str>().copied().unwrap_or_default();
        assert_eq!(text, "first thread fails");
        // The pool still works.
        run(|team| team.sync());
    }
}
