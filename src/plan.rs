//! Work plans: the partition of one call into independent items, run by rayon, by the
//! calling thread, or by an engine's own thread pool.
//!
//! The partition depends on the shape and backend only. An item is a
//! (batch, kv head, Q tile) group, or one split of its KV range when the groups are too
//! few to occupy every core (decode, split-KV): split items leave unnormalised partial
//! results, and whichever item of the group finishes last merges them in split order.
//! Every item computes the same numbers whoever runs it and in whatever order, so
//! results are bit-identical for every thread count.

use crate::attention::{Dims, Params};
use crate::backend::Backend;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernel::{Ctx, Layout, Sink, merge_group, run_item_on};
use crate::tensor::{Tensor, TensorMut};
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
#[cfg(feature = "rayon")]
use std::time::{Duration, Instant};

type ScratchBox = Box<dyn core::any::Any + Send>;

/// Scratch and partial buffers of finished plans, for the next calls: a model calls
/// attention with the same few shapes over and over, and allocating (and page-faulting)
/// them anew cost a tenth of shape d and most of a short call.
struct Idle {
    scratch: Vec<ScratchBox>,
    partials: Vec<Vec<f32>>,
}

static IDLE: Mutex<Idle> = Mutex::new(Idle {
    scratch: Vec::new(),
    partials: Vec::new(),
});

/// Idle scratch kept at most, per core: enough for every worker of two concurrent
/// calls. Each holds up to 16 MiB of K̂/V̂ panels besides its per-tile buffers, and none
/// is ever freed: a process keeps what its largest calls needed.
const IDLE_PER_CORE: usize = 2;

/// Read once: `available_parallelism` reads the cgroup's CPU quota from /proc and /sys
/// on every call, ~30 µs that a short decode call (33 µs of compute at Skv 32) paid on
/// each drop of its plan.
fn max_idle() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| IDLE_PER_CORE * std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Frees the scratch memory that finished calls keep for later ones.
///
/// Each call takes its per-worker scratch (packed K/V panels, tile buffers) from a
/// process-wide pool and returns it when its [`Plan`] is dropped, so a model's repeated
/// calls stop allocating after the first. The pool keeps at most two scratches per core,
/// each sized for the largest call it served (up to about 17 MiB). An engine that is
/// done with attention for a while, or that just ran an unusually large call, can give
/// that memory back with this function; later calls simply allocate again. Plans alive
/// at the time are not affected (their scratch joins the pool when they are dropped).
///
/// ```
/// flashcpu::release_scratch();
/// ```
pub fn release_scratch() {
    // Take the buffers out under the lock, free them after it is released.
    let (scratch, partials) = match IDLE.lock() {
        Ok(mut idle) => (
            core::mem::take(&mut idle.scratch),
            core::mem::take(&mut idle.partials),
        ),
        Err(_) => return,
    };
    drop(scratch);
    drop(partials);
}

fn idle_scratch() -> Option<ScratchBox> {
    IDLE.lock().ok()?.scratch.pop()
}

/// A buffer of `n` floats (contents unspecified: every partial slot is written by its
/// item before the merge reads it).
fn partial_buffer(n: usize) -> Vec<f32> {
    let mut v = IDLE
        .lock()
        .ok()
        .and_then(|mut i| i.partials.pop())
        .unwrap_or_default();
    v.resize(n, 0.0);
    v
}

/// A validated attention call cut into independent work items.
///
/// Build it with [`Attention::plan`](crate::Attention::plan), then run every item in
/// `0..plan.len()` exactly once, from any threads, in any order; the output is complete
/// when all have returned. [`run_all`](Self::run_all) does that with rayon (or on the
/// calling thread without the `rayon` feature).
///
/// ```
/// use flashcpu::{Attention, Tensor, TensorMut};
/// let (b, s, h, d) = (1, 1, 4, 8);
/// let q = vec![0.5f32; b * s * h * d];
/// let kv = vec![0.25f32; b * 600 * h * d];
/// let mut o = vec![0.0f32; b * s * h * d];
/// let attn = Attention::new();
/// let mut out = TensorMut::bshd(&mut o, [b, s, h, d])?;
/// let plan = attn.plan(
///     Tensor::bshd(&q, [b, s, h, d])?,
///     Tensor::bshd(&kv, [b, 600, h, d])?,
///     Tensor::bshd(&kv, [b, 600, h, d])?,
///     &mut out,
///     None,
/// )?;
/// for i in (0..plan.len()).rev() {
///     plan.run(i)?; // e.g. from an engine's own worker threads
/// }
/// drop(plan);
/// drop(out);
/// assert!((o[0] - 0.25).abs() < 1e-6);
/// # Ok::<(), flashcpu::Error>(())
/// ```
pub struct Plan<'p, Q, KV, O> {
    ctx: Ctx<'p, Q, KV, O>,
    backend: Backend,
    started: Box<[AtomicBool]>,
    /// Per group: splits not yet finished.
    remaining: Box<[AtomicUsize]>,
    /// Storage behind `ctx.sink.partial`; only reached through that pointer.
    partials: Vec<f32>,
    pool: Mutex<Vec<ScratchBox>>,
    _out: PhantomData<&'p mut [O]>,
}

impl<Q, KV, O> Drop for Plan<'_, Q, KV, O> {
    /// Hands the plan's scratch and partial buffers to the next calls.
    fn drop(&mut self) {
        let scratch = self.pool.get_mut().map(core::mem::take).unwrap_or_default();
        let partials = core::mem::take(&mut self.partials);
        if let Ok(mut idle) = IDLE.lock() {
            let max = max_idle();
            let room = max.saturating_sub(idle.scratch.len());
            idle.scratch.extend(scratch.into_iter().take(room));
            if partials.capacity() > 0 && idle.partials.len() < max {
                idle.partials.push(partials);
            }
        }
    }
}

impl<'p, Q: Element, KV: Element, O: Element> Plan<'p, Q, KV, O> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        backend: Backend,
        dims: Dims,
        params: Params<'p>,
        q: Tensor<'p, Q>,
        k: Tensor<'p, KV>,
        v: Tensor<'p, KV>,
        o: &'p mut TensorMut<'_, O>,
        lse: Option<&'p mut [f32]>,
    ) -> Self {
        let layout = Layout::new(&dims, backend);
        let mut partials = if layout.splits > 1 {
            partial_buffer(layout.items() * layout.slot(dims.dv))
        } else {
            Vec::new()
        };
        let (lse_ptr, lse_len) = match lse {
            Some(l) => (l.as_mut_ptr(), l.len()),
            None => (core::ptr::null_mut(), 0),
        };
        let sink = Sink {
            out: o.data.as_mut_ptr(),
            out_len: o.data.len(),
            strides: o.strides,
            dv: dims.dv,
            lse: lse_ptr,
            lse_len,
            partial: partials.as_mut_ptr(),
            partial_len: partials.len(),
        };
        let ctx = Ctx::new(dims, params, q, k, v, sink, layout);
        Plan {
            started: (0..layout.items())
                .map(|_| AtomicBool::new(false))
                .collect(),
            remaining: (0..if layout.splits > 1 { layout.groups } else { 0 })
                .map(|_| AtomicUsize::new(layout.splits))
                .collect(),
            ctx,
            backend,
            partials,
            pool: Mutex::new(Vec::new()),
            _out: PhantomData,
        }
    }

    /// The number of work items.
    pub fn len(&self) -> usize {
        self.started.len()
    }

    /// Whether there is nothing to compute (an empty batch, no heads or no queries).
    pub fn is_empty(&self) -> bool {
        self.started.is_empty()
    }

    /// How many ways each group's KV range is split (1 unless the call has too few
    /// (batch, kv head, Q tile) groups to occupy many cores, as in decode).
    pub fn kv_splits(&self) -> usize {
        self.ctx.layout.splits
    }

    /// The backend the items run on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs item `i`. Each item must run once: a second call, or an index past
    /// [`len`](Self::len), is an error and computes nothing.
    pub fn run(&self, i: usize) -> Result<()> {
        self.start(i)?;
        let mut scratch = self.take_scratch();
        let res = self.run_with(i, &mut scratch);
        self.give_scratch(scratch);
        res
    }

    /// Marks item `i` as started: an error if it is out of range or started before.
    fn start(&self, i: usize) -> Result<()> {
        if i >= self.len() {
            return Err(Error::param(
                "item",
                format!(
                    "index {i} is out of range (the plan has {} items)",
                    self.len()
                ),
            ));
        }
        if self.started[i].swap(true, Ordering::Relaxed) {
            return Err(Error::param("item", format!("item {i} has already run")));
        }
        Ok(())
    }

    /// A scratch for a worker: one the plan's items used, else an idle one (`None`: the
    /// kernel allocates).
    fn take_scratch(&self) -> Option<ScratchBox> {
        self.pool
            .lock()
            .map(|mut p| p.pop())
            .unwrap_or(None)
            .or_else(idle_scratch)
    }

    /// Returns a worker's scratch to the plan (the process-wide pool gets it on drop).
    fn give_scratch(&self, scratch: Option<ScratchBox>) {
        if let Some(s) = scratch
            && let Ok(mut p) = self.pool.lock()
        {
            p.push(s);
        }
    }

    /// Runs item `i` (claimed by the caller: `started[i]` was set by it) on `scratch`, then
    /// merges its group's splits if it was the group's last.
    fn run_with(&self, i: usize, scratch: &mut Option<ScratchBox>) -> Result<()> {
        run_item_on(self.backend, &self.ctx, i, scratch)?;
        let lay = &self.ctx.layout;
        if lay.splits > 1 {
            let group = i / lay.splits;
            // AcqRel: this item's partial writes are released to, and every other
            // split's acquired by, whoever brings the count to zero.
            if self.remaining[group].fetch_sub(1, Ordering::AcqRel) == 1 {
                // SAFETY: the counter reached zero, so every split of the group finished
                // and its writes happen-before this point.
                unsafe { merge_group(&self.ctx, group) };
            }
        }
        Ok(())
    }

    /// Runs every item: with the `rayon` feature on `threads` workers (0: as many as
    /// rayon's current pool has threads), the calling thread and `threads − 1` tasks on
    /// that pool; else (or with `threads == 1`) on the calling thread alone. Workers
    /// claim items as [`Claims`] describes. A calling thread outside the pool that runs
    /// out of items busy-waits for the others, at most its longest item + 200 µs
    /// (`WAKE_SLACK`), rather than sleep and be woken late.
    pub fn run_all(&self, threads: usize) -> Result<()> {
        #[cfg(feature = "rayon")]
        {
            let pool = rayon::current_num_threads();
            let workers = match threads {
                0 => pool,
                n => n.min(pool),
            }
            .min(self.len());
            if let Some(claims) = Claims::new(self.len(), workers).filter(|_| workers > 1) {
                let failed: Mutex<Option<Error>> = Mutex::new(None);
                // Each worker keeps one scratch for all its items: taking one from the
                // plan's pool per item, two workers finishing items at the same moment
                // could swap theirs, and the next item of a head then found another
                // head's panels and packed its K/V again.
                // Returns the longest item it ran.
                let work = |w: usize| {
                    let mut longest = Duration::ZERO;
                    let mut scratch = self.take_scratch();
                    while let Some(i) = claims.next(w) {
                        let t = Instant::now();
                        let res = self.start(i).and_then(|()| self.run_with(i, &mut scratch));
                        longest = longest.max(t.elapsed());
                        if let Err(e) = res {
                            // Stop every worker: the output is incomplete anyway.
                            claims.stop();
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            break;
                        }
                    }
                    self.give_scratch(scratch);
                    longest
                };
                // The calling thread is one of the workers: it is awake already, and the
                // pool's threads (which sleep between calls) join as they wake. With
                // `rayon::scope` the caller slept while every worker was woken, and a
                // 3 ms decode call on 2 threads often ran no faster than on 1.
                let spawned = Spawned::default();
                rayon::in_place_scope(|s| {
                    for w in 1..workers {
                        let (work, spawned) = (&work, &spawned);
                        s.spawn(move |_| {
                            spawned.started.fetch_add(1, Ordering::Relaxed);
                            // Counted as done even if `work` panics (rayon then rethrows).
                            let _done = Done(&spawned.done);
                            work(w);
                        });
                    }
                    let longest = work(0);
                    // Every item is claimed now, so a started worker is at most one item
                    // from done: a caller outside the pool spins that long for it before
                    // rayon's wait, which sleeps (workers yet to start find nothing to
                    // claim; they get WAKE_SLACK). Woken from that sleep, it returned
                    // 45–65 µs after the last worker finished, against 16 µs spinning
                    // (decode c on 2 threads, Sapphire Rapids guest: 1.77 -> 1.72 ms, 8
                    // interleaved rounds). A caller inside the pool does not spin: its
                    // wait runs other jobs.
                    if rayon::current_thread_index().is_none() {
                        spawned.spin(workers - 1, longest);
                    }
                });
                return match failed.into_inner() {
                    Ok(Some(e)) => Err(e),
                    _ => Ok(()),
                };
            }
        }
        let _ = threads;
        let mut scratch = self.take_scratch();
        let res = (0..self.len()).try_for_each(|i| {
            self.start(i)?;
            self.run_with(i, &mut scratch)
        });
        self.give_scratch(scratch);
        res
    }
}

/// Time a worker may take to wake, beyond an item's duration, that
/// [`Plan::run_all`]'s caller spins for before sleeping: a parked rayon thread took
/// 70–160 µs to wake on the Sapphire Rapids guest.
#[cfg(feature = "rayon")]
const WAKE_SLACK: Duration = Duration::from_micros(200);

/// How many of [`Plan::run_all`]'s spawned workers have started, and finished.
#[cfg(feature = "rayon")]
#[derive(Default)]
struct Spawned {
    started: AtomicUsize,
    done: AtomicUsize,
}

#[cfg(feature = "rayon")]
impl Spawned {
    /// Spins until all `n` spawned workers are done: at most `longest + WAKE_SLACK` while
    /// one that started is still running, and WAKE_SLACK while the rest have yet to start.
    fn spin(&self, n: usize, longest: Duration) {
        let t = Instant::now();
        loop {
            let done = self.done.load(Ordering::Acquire);
            if done >= n {
                return;
            }
            let running = self.started.load(Ordering::Relaxed) > done;
            let limit = if running {
                longest + WAKE_SLACK
            } else {
                WAKE_SLACK
            };
            if t.elapsed() >= limit {
                return;
            }
            core::hint::spin_loop();
        }
    }
}

/// Counts a spawned worker as done when dropped.
#[cfg(feature = "rayon")]
struct Done<'a>(&'a AtomicUsize);

#[cfg(feature = "rayon")]
impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Which worker runs which item of [`Plan::run_all`].
///
/// Worker `w` starts on its own contiguous `w`-th share of the item indices, in index
/// order, and a worker whose share is done takes items from the end of the share with
/// the most left. Consecutive items of one (batch, kv head) then stay on one worker, which
/// packs that head's K/V panels once and reuses them ([`crate::kernel`]'s panel cache);
/// with one shared counter the workers alternated, and each packed every head. Items of
/// a head come longest first (a causal mask's last Q tile sees the most keys), so the
/// items taken at the end are the short ones.
///
/// Which worker runs an item never changes its result: only the speed depends on this.
#[cfg(feature = "rayon")]
struct Claims {
    /// Per worker: the indices `front..end` of its share not yet claimed, as
    /// `front << 32 | end`, so that a claim from either end is one compare-and-swap.
    shares: Box<[std::sync::atomic::AtomicU64]>,
}

#[cfg(feature = "rayon")]
impl Claims {
    /// `None` when the indices do not fit 32 bits.
    fn new(items: usize, workers: usize) -> Option<Self> {
        let n = u32::try_from(items).ok()? as u64;
        let w = workers.max(1) as u64;
        let shares = (0..w)
            .map(|i| std::sync::atomic::AtomicU64::new(share(n * i / w, n * (i + 1) / w)))
            .collect();
        Some(Claims { shares })
    }

    /// The next item for worker `w`, or `None` when every item is claimed.
    fn next(&self, w: usize) -> Option<usize> {
        // The own share's front.
        let own = &self.shares[w];
        let mut cur = own.load(Ordering::Relaxed);
        loop {
            let (f, e) = split(cur);
            if f >= e {
                break;
            }
            match own.compare_exchange_weak(
                cur,
                share(f + 1, e),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(f as usize),
                Err(x) => cur = x,
            }
        }
        // The back of the share with the most left.
        loop {
            let (victim, cur) = self
                .shares
                .iter()
                .map(|s| (s, s.load(Ordering::Relaxed)))
                .max_by_key(|&(_, x)| {
                    let (f, e) = split(x);
                    e.saturating_sub(f)
                })?;
            let (f, e) = split(cur);
            if f >= e {
                return None;
            }
            if victim
                .compare_exchange_weak(cur, share(f, e - 1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some(e as usize - 1);
            }
        }
    }

    /// Leaves no item to claim.
    fn stop(&self) {
        for s in self.shares.iter() {
            s.store(0, Ordering::Relaxed);
        }
    }
}

/// The packed share `front..end` (indices below 2³²).
#[cfg(feature = "rayon")]
fn share(front: u64, end: u64) -> u64 {
    (front << 32) | end
}

/// The `(front, end)` of a packed share.
#[cfg(feature = "rayon")]
fn split(x: u64) -> (u64, u64) {
    (x >> 32, x & 0xffff_ffff)
}

#[cfg(all(test, feature = "rayon"))]
mod tests {
    use super::Claims;

    /// Every index is claimed exactly once, by workers racing on real threads, whatever
    /// the number of items against workers. The workers start together (a barrier) and
    /// spin a little per item, so owners and thieves meet on the last items of a share;
    /// each case runs many times.
    #[test]
    fn claims_cover_every_item_once() {
        let cases = [
            (0, 2),
            (1, 2),
            (2, 2),
            (3, 2),
            (5, 3),
            (48, 2),
            (344, 3),
            (1000, 8),
        ];
        for (items, workers) in cases {
            for rep in 0..if items < 100 { 300 } else { 20 } {
                claims_once(items, workers, rep % 7);
            }
        }
    }

    fn claims_once(items: usize, workers: usize, spin: usize) {
        let claims = Claims::new(items, workers).unwrap();
        let barrier = std::sync::Barrier::new(workers);
        let got: Vec<Vec<usize>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|w| {
                    let (claims, barrier) = (&claims, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let mut mine = Vec::new();
                        while let Some(i) = claims.next(w) {
                            mine.push(i);
                            for _ in 0..spin * (w + 1) {
                                core::hint::spin_loop();
                            }
                        }
                        mine
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<usize> = got.concat();
        all.sort_unstable();
        let want: Vec<usize> = (0..items).collect();
        assert_eq!(all, want, "{items} items, {workers} workers, spin {spin}");
    }

    /// `stop` racing with claims: no index is claimed twice, and every worker ends.
    #[test]
    fn claims_stop_while_claiming() {
        for _ in 0..200 {
            let claims = Claims::new(64, 3).unwrap();
            let got: Vec<Vec<usize>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..3)
                    .map(|w| {
                        let claims = &claims;
                        s.spawn(move || {
                            let mut mine = Vec::new();
                            while let Some(i) = claims.next(w) {
                                mine.push(i);
                                if w == 2 && mine.len() == 3 {
                                    claims.stop();
                                }
                            }
                            mine
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut all = got.concat();
            let n = all.len();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), n, "an index claimed twice");
        }
    }

    /// More items than 32 bits can index: no claims (the caller runs them in turn).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn claims_too_many_items() {
        assert!(Claims::new(1 << 32, 2).is_none());
        assert!(Claims::new(u32::MAX as usize, 2).is_some());
    }

    /// A worker alone runs its own share front to back, then the others' from the back.
    #[test]
    fn claims_order() {
        let claims = Claims::new(10, 2).unwrap();
        let order: Vec<usize> = core::iter::from_fn(|| claims.next(1)).collect();
        assert_eq!(order, [5, 6, 7, 8, 9, 4, 3, 2, 1, 0]);
        let claims = Claims::new(10, 2).unwrap();
        claims.stop();
        assert_eq!(claims.next(0), None);
    }
}
