//! The performance report: measures this machine's limits, then flashcpu against them.
//!
//! ```text
//! cargo run --release --example bench                         # everything, ~2-3 minutes
//! cargo run --release --example bench -- --json --threads 1   # one JSON object per line
//! cargo run --release --example bench -- --shapes a,c --backends avx512
//! ```
//!
//! 1. **FMA peak** of one core, per backend: a register-blocked loop of independent
//!    multiply-add chains (24 vectors on 32-register ISAs, 12 on 16-register ones), written
//!    once over `pulp::Simd` and entered through a `WithSimd` struct, best of 5 runs. For
//!    the scalar backend on x86-64 the limit is SSE2 (4 lanes, multiply then add): the
//!    crate is built for baseline x86-64 and LLVM auto-vectorises parts of the scalar
//!    kernel with it. The same loop on every thread at once gives the peak per thread
//!    when all cores run (printed as a diagnostic: shared clocks or hyperthreads put it
//!    below the one-core figure, and no schedule can scale past it).
//! 2. **DRAM read bandwidth**: a SIMD sum over a 1 GiB buffer, on 1 thread and on every
//!    thread count the run uses, best of 5.
//! 3. **Attention**: each shape, backend and thread count; a warm-up call, then repeated
//!    timed calls (about `--budget` seconds, at least 3, at most 50), reporting the median.
//!    The thread counts of a shape and backend take turns call by call, so that they
//!    share the host's conditions, and each reports its speedup over one thread (`×
//!    1 thread`, JSON `speedup`) from those medians.
//!    Before every timed call Q, K, V and O are flushed from every cache level (`clflush`
//!    on x86-64) and then a 64 MiB buffer is read (elsewhere, twice the last-level cache
//!    and at least 64 MiB, in place of the flush), so K/V start cold, as they do in a
//!    model where every layer has its own KV cache. A fixed-size read alone is not enough
//!    on hosts with a large L3: on a Sapphire Rapids guest reporting 260 MiB of L3,
//!    decode c's 32 MiB of K+V stayed in it and timed at 116–143 % of the DRAM
//!    bandwidth. With several threads every thread of the pool reads its share at the
//!    same time as the caller (each core's L2 is private), which also leaves the pool's
//!    threads awake when the call starts, as the other operators of a model step leave
//!    them: a parked pool thread took 80–160 µs to wake on the Sapphire Rapids guest
//!    (about 1 ms on the Ice Lake one), a tenth or more of a 2-thread decode call.
//!
//! FLOPs = 4·b·hq·d·(visible query/key pairs): `sq·skv` without a mask, `S(S+1)/2` causal
//! with `sq = skv = S`. `% peak` divides by `threads × the backend's one-core peak`.
//! GB/s counts K and V once per kv head, in their storage type (c-f16 and c-bf16 read a
//! half-precision KV cache: 2 bytes a value), the bytes a perfect kernel must read; `% bw`
//! divides by the measured bandwidth for the same thread count.

use flashcpu::{Attention, Backend, Tensor, TensorMut, bf16, f16};
use pulp::{Simd, WithSimd};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// One benchmark problem; K and V share the head dim `d`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    b: usize,
    sq: usize,
    skv: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    /// Storage type of K and V (Q and O are f32).
    kv: Kv,
}

/// Storage type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kv {
    F32,
    F16,
    Bf16,
}

/// Shape c, which the half-precision decode shapes vary.
const DECODE_C: Shape = Shape {
    name: "c",
    b: 1,
    sq: 1,
    skv: 4096,
    hq: 32,
    hkv: 8,
    d: 128,
    causal: true,
    kv: Kv::F32,
};

const SHAPES: [Shape; 7] = [
    // a: MHA prefill, no mask.
    Shape {
        name: "a",
        b: 1,
        sq: 1024,
        skv: 1024,
        hq: 8,
        hkv: 8,
        d: 128,
        causal: false,
        kv: Kv::F32,
    },
    // b: GQA causal prefill (Llama-3-8B-like heads).
    Shape {
        name: "b",
        b: 1,
        sq: 2048,
        skv: 2048,
        hq: 32,
        hkv: 8,
        d: 128,
        causal: true,
        kv: Kv::F32,
    },
    // c: GQA decode, one query against a 4k cache.
    DECODE_C,
    // d: small-head MHA (BERT/GPT-2-like), no mask.
    Shape {
        name: "d",
        b: 1,
        sq: 512,
        skv: 512,
        hq: 12,
        hkv: 12,
        d: 64,
        causal: false,
        kv: Kv::F32,
    },
    // c32k: decode against a 32k cache (256 MiB of K+V: DRAM bound).
    Shape {
        name: "c32k",
        b: 1,
        sq: 1,
        skv: 32768,
        hq: 32,
        hkv: 8,
        d: 128,
        causal: true,
        kv: Kv::F32,
    },
    // c-f16, c-bf16: decode c over a half-precision KV cache (half the bytes to read).
    Shape {
        name: "c-f16",
        kv: Kv::F16,
        ..DECODE_C
    },
    Shape {
        name: "c-bf16",
        kv: Kv::Bf16,
        ..DECODE_C
    },
];

impl Shape {
    /// Query/key pairs the mask leaves visible (causal is bottom-right aligned).
    fn visible_pairs(&self) -> u64 {
        if !self.causal {
            return (self.sq * self.skv) as u64;
        }
        (0..self.sq)
            .map(|i| {
                (i + self.skv)
                    .saturating_sub(self.sq)
                    .saturating_add(1)
                    .min(self.skv) as u64
            })
            .sum()
    }

    fn flops(&self) -> f64 {
        4.0 * (self.b * self.hq * self.d) as f64 * self.visible_pairs() as f64
    }

    /// Bytes of K and V, each row read once per kv head.
    fn kv_bytes(&self) -> f64 {
        let size = if self.kv == Kv::F32 { 4 } else { 2 };
        (self.b * self.hkv * self.skv * 2 * self.d * size) as f64
    }

    fn describe(&self) -> String {
        format!(
            "B{} Hq{} Hkv{} Sq{} Skv{} D{}{}{}",
            self.b,
            self.hq,
            self.hkv,
            self.sq,
            self.skv,
            self.d,
            if self.causal { " causal" } else { "" },
            match self.kv {
                Kv::F32 => "",
                Kv::F16 => " KV f16",
                Kv::Bf16 => " KV bf16",
            }
        )
    }
}

// ---------------------------------------------------------------------------------------
// Machine limits
// ---------------------------------------------------------------------------------------

/// `CHAINS` independent `acc = acc·a + b` chains per iteration: enough to cover the FMA
/// latency on every port, few enough to stay in registers with `a` and `b`.
struct FmaPeak {
    iters: usize,
}

impl WithSimd for FmaPeak {
    /// The FLOPs done (and a value to keep the result alive).
    type Output = (f64, f32);
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> (f64, f32) {
        if S::REGISTER_COUNT >= 32 {
            fma_chains::<S, 24>(simd, self.iters)
        } else {
            fma_chains::<S, 12>(simd, self.iters)
        }
    }
}

#[inline(always)]
fn fma_chains<S: Simd, const CHAINS: usize>(simd: S, iters: usize) -> (f64, f32) {
    let a = simd.splat_f32s(black_box(0.999_999));
    let b = simd.splat_f32s(black_box(1e-6));
    let mut acc = [simd.splat_f32s(0.0); CHAINS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = simd.splat_f32s(i as f32);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = simd.mul_add_e_f32s(*x, a, b);
        }
    }
    let mut s = simd.splat_f32s(0.0);
    for x in acc {
        s = simd.add_f32s(s, x);
    }
    let flops = 2.0 * (iters * CHAINS * S::F32_LANES) as f64;
    (flops, simd.reduce_sum_f32s(s))
}

/// Runs `op` on `backend`'s pulp token.
fn run_on<Op: WithSimd>(backend: Backend, op: Op) -> Op::Output {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => {
            Simd::vectorize(pulp::x86::V4::try_new().expect("AVX-512 is available"), op)
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => Simd::vectorize(pulp::x86::V3::try_new().expect("AVX2 is available"), op),
        #[cfg(target_arch = "aarch64")]
        Backend::Neon => Simd::vectorize(
            pulp::aarch64::Neon::try_new().expect("NEON is available"),
            op,
        ),
        _ => Simd::vectorize(pulp::Scalar::new(), op),
    }
}

/// The scalar backend's limit on x86-64: the build targets baseline x86-64, where LLVM
/// auto-vectorises parts of the "scalar" kernel with SSE2, so its ceiling is 4-lane
/// non-fused multiply + add (12 chains), not one lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn sse2_mul_add(iters: usize) -> (f64, f32) {
    use std::arch::x86_64::*;
    let a = _mm_set1_ps(black_box(0.999_999));
    let b = _mm_set1_ps(black_box(1e-6));
    let mut acc = [_mm_setzero_ps(); 12];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm_set1_ps(i as f32);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm_add_ps(_mm_mul_ps(*x, a), b);
        }
    }
    let mut s = _mm_setzero_ps();
    for x in acc {
        s = _mm_add_ps(s, x);
    }
    let mut out = [0.0f32; 4];
    // SAFETY: `out` holds 4 f32, the unaligned store writes exactly 16 bytes.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
    (2.0 * (iters * 12 * 4) as f64, out.iter().sum())
}

/// `backend`'s peak loop: `FmaPeak` on its pulp token (SSE2 mul+add for scalar on x86-64).
fn peak_loop(backend: Backend, iters: usize) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Scalar {
        // SAFETY: SSE2 is part of the x86-64 baseline.
        return unsafe { sse2_mul_add(iters) };
    }
    run_on(backend, FmaPeak { iters })
}

/// One core's FMA peak for `backend` in GFLOP/s, best of 5 runs of ~0.1 s.
fn measure_peak(backend: Backend) -> f64 {
    measure_peak_on(backend, 1)
}

/// The FMA peak of `threads` threads running the peak loop at once, in GFLOP/s per
/// thread, best of 5 runs of ~0.1 s. Below `measure_peak` where cores share a power or
/// frequency budget (wider vectors on more cores often run at a lower clock) or are
/// hyperthreads: the part of a scaling shortfall no schedule can win back.
fn measure_peak_on(backend: Backend, threads: usize) -> f64 {
    let mut iters = 1 << 16;
    // Calibrate to ~0.1 s per run.
    loop {
        let t = Instant::now();
        black_box(peak_loop(backend, iters));
        if t.elapsed() > Duration::from_millis(25) {
            iters *= 4;
            break;
        }
        iters *= 2;
    }
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let flops: f64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|_| s.spawn(|| black_box(peak_loop(backend, iters)).0))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            flops / t.elapsed().as_secs_f64() / 1e9 / threads as f64
        })
        .fold(0.0, f64::max)
}

struct SumF32<'a>(&'a [f32]);

impl WithSimd for SumF32<'_> {
    type Output = f32;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (head, tail) = S::as_simd_f32s(self.0);
        let mut acc = [simd.splat_f32s(0.0); 8];
        let mut chunks = head.chunks_exact(8);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a = simd.add_f32s(*a, *x);
            }
        }
        let mut s = simd.splat_f32s(0.0);
        for x in chunks.remainder().iter().chain(&acc) {
            s = simd.add_f32s(s, *x);
        }
        simd.reduce_sum_f32s(s) + tail.iter().sum::<f32>()
    }
}

/// Read bandwidth in GB/s of `threads` threads summing disjoint parts of `buf`, best of 5.
fn measure_bw(buf: &[f32], threads: usize, backend: Backend) -> f64 {
    let part = buf.len().div_ceil(threads);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let total: f32 = std::thread::scope(|s| {
                let hs: Vec<_> = buf
                    .chunks(part)
                    .map(|c| s.spawn(move || run_on(backend, SumF32(c))))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            black_box(total);
            std::mem::size_of_val(buf) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

// ---------------------------------------------------------------------------------------
// Attention runs
// ---------------------------------------------------------------------------------------

/// One cache line of floats, the unit of [`Lines`].
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `len` floats that start on a 64-byte line, as inference engines allocate their KV
/// caches. A large `Vec<f32>` starts 16 bytes into a line here, and then every K and V
/// row of a decode call straddles lines: decode c and c32k ran 5–9 % slower so.
struct Lines {
    lines: Vec<Line>,
    len: usize,
}

impl Lines {
    fn new(len: usize, mut f: impl FnMut() -> f32) -> Lines {
        let mut lines = vec![Line([0.0; 16]); len.div_ceil(16)];
        for x in &mut bytemuck::cast_slice_mut::<Line, f32>(&mut lines)[..len] {
            *x = f();
        }
        Lines { lines, len }
    }

    fn get(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    fn get_mut(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }

    /// The same values rounded to a 2-byte type `T`, in lines of their own: read them
    /// with [`Lines::get_as`] only (`get` would see pairs of them as f32s).
    fn to_half<T: bytemuck::Pod>(&self, f: impl Fn(f32) -> T) -> Lines {
        let mut out = Lines::new(self.len.div_ceil(2), || 0.0);
        let dst: &mut [T] = bytemuck::cast_slice_mut(&mut out.lines);
        for (d, &x) in dst.iter_mut().zip(self.get()) {
            *d = f(x);
        }
        out
    }

    /// The first `len` values of type `T` (stored by [`Lines::to_half`]).
    fn get_as<T: bytemuck::Pod>(&self, len: usize) -> &[T] {
        &bytemuck::cast_slice(&self.lines)[..len]
    }
}

struct Data {
    q: Lines,
    k: Lines,
    v: Lines,
    o: Lines,
}

impl Data {
    fn new(s: &Shape, rng: &mut StdRng) -> Data {
        let mut gen_vec = |n: usize| Lines::new(n, || rng.random_range(-1.0f32..1.0));
        let q = gen_vec(s.b * s.sq * s.hq * s.d);
        let (mut k, mut v) = (
            gen_vec(s.b * s.skv * s.hkv * s.d),
            gen_vec(s.b * s.skv * s.hkv * s.d),
        );
        match s.kv {
            Kv::F32 => {}
            Kv::F16 => (k, v) = (k.to_half(f16::from_f32), v.to_half(f16::from_f32)),
            Kv::Bf16 => (k, v) = (k.to_half(bf16::from_f32), v.to_half(bf16::from_f32)),
        }
        Data {
            q,
            k,
            v,
            o: Lines::new(s.b * s.sq * s.hq * s.d, || 0.0),
        }
    }

    /// Takes the operands out of every cache level, where [`flush_lines`] can.
    fn flush(&self) {
        for t in [&self.q, &self.k, &self.v, &self.o] {
            flush_lines(&t.lines);
        }
    }

    fn forward(&mut self, s: &Shape, attn: &Attention) {
        let q = Tensor::bshd(self.q.get(), [s.b, s.sq, s.hq, s.d]).unwrap();
        let kv_shape = [s.b, s.skv, s.hkv, s.d];
        let n = kv_shape.iter().product();
        let mut o = TensorMut::bshd(self.o.get_mut(), [s.b, s.sq, s.hq, s.d]).unwrap();
        match s.kv {
            Kv::F32 => {
                let k = Tensor::bshd(self.k.get(), kv_shape).unwrap();
                let v = Tensor::bshd(self.v.get(), kv_shape).unwrap();
                attn.forward(q, k, v, &mut o).unwrap();
            }
            Kv::F16 => {
                let k = Tensor::bshd(self.k.get_as::<f16>(n), kv_shape).unwrap();
                let v = Tensor::bshd(self.v.get_as::<f16>(n), kv_shape).unwrap();
                attn.forward(q, k, v, &mut o).unwrap();
            }
            Kv::Bf16 => {
                let k = Tensor::bshd(self.k.get_as::<bf16>(n), kv_shape).unwrap();
                let v = Tensor::bshd(self.v.get_as::<bf16>(n), kv_shape).unwrap();
                attn.forward(q, k, v, &mut o).unwrap();
            }
        }
    }
}

/// Reads `buf` so the next call starts with cold private caches (and, where
/// [`flush_lines`] cannot flush, a cold last-level cache: see [`eviction_bytes`]).
fn evict(buf: &[u8]) {
    let mut x = 0u8;
    for line in buf.chunks(64) {
        x = x.wrapping_add(line[0]);
    }
    black_box(x);
}

/// Reads `buf` (see [`evict`]) in shares: one on the calling thread and one on each
/// thread of rayon's global pool at the same time, so that every core's caches are cold
/// and the pool's threads have just run, as after an engine's previous operation on all
/// cores.
///
/// The pool's shares run as a `spawn_broadcast` while the caller reads its own, and the
/// caller then waits for them yielding, not asleep, so the timed call starts while the
/// pool's threads are still awake looking for work, which they do for a few tens of µs
/// after a job. Waiting in `rayon::broadcast` instead, the caller slept and was woken after
/// the pool's threads had parked again: the pool thread then joined a 2-thread decode
/// call 80–160 µs late (the time to wake a parked thread in this VM), against 4–9 µs
/// awake (decode c, Sapphire Rapids guest), and c on 2 threads timed 1.66 against
/// 1.54 ms.
///
/// The timed calls run on the main thread (as an engine's own thread would call), with
/// `Attention::threads(n)`: for more than 1 thread, tasks on rayon's global pool join it.
/// An earlier version ran each call inside `ThreadPool::install` of a pool of that size.
/// The main thread then slept while a pool thread was woken to make the call, which then
/// woke the second: two wake-ups in a row on a VM whose idle vCPUs wake slowly. Decode c
/// on 2 threads timed 2.6–2.7 ms that way, and 1.7–2.0 ms from the main thread (Zen 3
/// guest, three runs each).
fn evict_for(threads: usize, buf: &'static [u8]) {
    #[cfg(feature = "rayon")]
    if threads > 1 {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = rayon::current_num_threads();
        let share = buf.len().div_ceil(pool + 1).max(1);
        let done = Arc::new(AtomicUsize::new(0));
        let d = Arc::clone(&done);
        rayon::spawn_broadcast(move |ctx| {
            if let Some(chunk) = buf.chunks(share).nth(ctx.index() + 1) {
                evict(chunk);
            }
            d.fetch_add(1, Ordering::Release);
        });
        evict(&buf[..share.min(buf.len())]);
        // Yielding: the caller and the pool are one thread more than the cores, and a
        // pool thread still reading may share the caller's core.
        while done.load(Ordering::Acquire) < pool {
            std::thread::yield_now();
        }
        return;
    }
    let _ = threads;
    evict(buf)
}

/// Bytes [`evict`] reads before each timed call: 64 MiB where [`flush_lines`] takes the
/// operands out of the last-level cache, else twice that cache (read from sysfs), at
/// least 64 MiB.
fn eviction_bytes() -> usize {
    const MIN: usize = 64 << 20;
    if cfg!(target_arch = "x86_64") {
        return MIN;
    }
    (0..8)
        .filter_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let size = size.trim();
            let (num, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
            let shift = match unit {
                "K" => 10,
                "M" => 20,
                _ => return None,
            };
            (level.trim() == "3").then(|| num.parse::<usize>().ok().map(|n| n << shift))?
        })
        .map(|llc| 2 * llc)
        .fold(MIN, usize::max)
}

/// Flushes every cache line of `lines` from every level of the cache hierarchy (x86-64's
/// `clflush`; a no-op elsewhere, where [`eviction_bytes`] sizes the read instead).
fn flush_lines(lines: &[Line]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_clflush, _mm_mfence};
        for line in lines {
            // SAFETY: `clflush` is part of SSE2, baseline on x86-64; it takes any address
            // and `line` is a valid reference.
            unsafe { _mm_clflush((line as *const Line).cast()) };
        }
        // SAFETY: SSE2, as above.
        unsafe { _mm_mfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = lines;
}

struct Timing {
    median_ms: f64,
    min_ms: f64,
    reps: usize,
}

/// Times `call(data, i)` for each of `runs` runs (the thread counts of one shape and
/// backend), with `evict(data, i)` before each timed call (not timed).
///
/// The runs take turns, one call each per round, so that they share the machine's
/// conditions: timed one after the other on this shared host, a run that met a busy
/// neighbour's minute made the two-thread speedup anywhere from 1.64 to 1.92× for the
/// same build.
fn time_calls(
    budget: f64,
    data: &mut Data,
    runs: usize,
    evict: impl Fn(&Data, usize),
    call: impl Fn(&mut Data, usize),
) -> Vec<Timing> {
    // Warm-up: page in the data, spin up the pool, fill the scratch buffers.
    let mut first = 0.0;
    for i in 0..runs {
        let t = Instant::now();
        call(data, i);
        let f = t.elapsed().as_secs_f64();
        if f < 0.05 {
            let t = Instant::now();
            while t.elapsed().as_secs_f64() < 0.05 {
                call(data, i);
            }
        }
        first += f;
    }
    // `budget` seconds per run.
    let reps = ((budget * runs as f64 / first.max(1e-6)) as usize).clamp(3, 50);
    let mut ms = vec![Vec::with_capacity(reps); runs];
    for _ in 0..reps {
        for (i, ms) in ms.iter_mut().enumerate() {
            evict(data, i);
            let t = Instant::now();
            call(data, i);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.into_iter()
        .map(|mut ms| {
            ms.sort_by(f64::total_cmp);
            let median_ms = if reps % 2 == 1 {
                ms[reps / 2]
            } else {
                0.5 * (ms[reps / 2 - 1] + ms[reps / 2])
            };
            Timing {
                median_ms,
                min_ms: ms[0],
                reps,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

struct Options {
    json: bool,
    threads: Vec<usize>,
    shapes: Vec<Shape>,
    backends: Vec<Backend>,
    budget: f64,
}

const USAGE: &str = "\
usage: bench [--json] [--threads N[,M..]] [--shapes a,b,c,d,c32k,c-f16,c-bf16]
             [--backends avx512,avx2,scalar]
             [--budget SECONDS]
  --json       one JSON object per line (limits first, then one per run) instead of a table
  --threads    thread counts to run (default: 1 and all cores)
  --shapes     shapes to run (default: all)
  --backends   backends to run (default: every available one)
  --budget     seconds of timed calls per run (default 0.6; at least 3 and at most 50 calls)";

fn parse_args() -> Result<Options, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut o = Options {
        json: false,
        threads: if cores > 1 { vec![1, cores] } else { vec![1] },
        shapes: SHAPES.to_vec(),
        backends: Backend::available(),
        budget: 0.6,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--json" => o.json = true,
            "--threads" => {
                o.threads = value("--threads")?
                    .split(',')
                    .map(|t| match t.trim().parse::<usize>() {
                        Ok(n) if n > 0 => Ok(n),
                        _ => Err(format!("bad thread count {t:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--shapes" => {
                o.shapes = value("--shapes")?
                    .split(',')
                    .map(|n| {
                        SHAPES
                            .iter()
                            .find(|s| s.name == n.trim())
                            .copied()
                            .ok_or(format!("unknown shape {n:?}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--backends" => {
                o.backends = value("--backends")?
                    .split(',')
                    .map(|n| {
                        n.parse::<Backend>()
                            .and_then(|b| b.require())
                            .map_err(|e| e.to_string())
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--budget" => {
                o.budget = value("--budget")?
                    .parse()
                    .map_err(|e| format!("bad --budget: {e}"))?;
            }
            "--bench" => {} // passed by `cargo bench --example`-style runners
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if cfg!(not(feature = "rayon")) && o.threads.iter().any(|&t| t > 1) {
        eprintln!("note: built without the `rayon` feature; running 1 thread only");
        o.threads = vec![1];
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    #[cfg(feature = "rayon")]
    {
        // Workers beyond the calling thread come from the global pool: size it for the
        // largest thread count asked for (it may have been built already; then it stays).
        let most = opts.threads.iter().copied().max().unwrap_or(1).max(cores);
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(most)
            .build_global();
    }

    // Limits.
    let mut peak = BTreeMap::new();
    for &b in &opts.backends {
        peak.insert(b, measure_peak(b));
    }
    // The same loop on the largest thread count at once, per thread (a diagnostic: "%
    // peak" stays against threads × the one-core figure).
    let all = opts.threads.iter().copied().max().unwrap_or(1);
    let peak_all: BTreeMap<Backend, f64> = if all > 1 {
        let m = opts.backends.iter().map(|&b| (b, measure_peak_on(b, all)));
        m.collect()
    } else {
        BTreeMap::new()
    };
    let mut bw = BTreeMap::new();
    {
        let buf = vec![1.0f32; (1 << 30) / 4]; // 1 GiB, every page touched
        let mut counts = opts.threads.clone();
        counts.push(1);
        counts.sort_unstable();
        counts.dedup();
        for t in counts {
            bw.insert(t, measure_bw(&buf, t, Backend::detect()));
        }
    }

    let peak_json: Vec<String> = peak
        .iter()
        .map(|(b, g)| format!("\"{}\": {g:.1}", b.name()))
        .collect();
    let peak_all_json: Vec<String> = peak_all
        .iter()
        .map(|(b, g)| format!("\"{}\": {g:.1}", b.name()))
        .collect();
    let bw_json: Vec<String> = bw.iter().map(|(t, g)| format!("\"{t}\": {g:.2}")).collect();
    if opts.json {
        println!(
            "{{\"peak_gflops\": {{{}}}, \"peak_gflops_per_thread_all\": {{{}}}, \
             \"all_threads\": {all}, \"bw_gbps\": {{{}}}, \"cores\": {cores}}}",
            peak_json.join(", "),
            peak_all_json.join(", "),
            bw_json.join(", ")
        );
    } else {
        println!("flashcpu bench — {cores} cores, {}", std::env::consts::ARCH);
        let p: Vec<String> = peak
            .iter()
            .map(|(b, g)| format!("{} {g:.1}", b.name()))
            .collect();
        println!("measured FMA peak, one core (GFLOP/s): {}", p.join(", "));
        if !peak_all.is_empty() {
            let p: Vec<String> = peak_all
                .iter()
                .map(|(b, g)| format!("{} {g:.1}", b.name()))
                .collect();
            println!(
                "measured FMA peak per thread, {all} threads at once (GFLOP/s): {}",
                p.join(", ")
            );
        }
        let w: Vec<String> = bw
            .iter()
            .map(|(t, g)| format!("{t} thread{} {g:.1}", if *t == 1 { "" } else { "s" }))
            .collect();
        println!(
            "measured DRAM read bandwidth, 1 GiB sum (GB/s): {}",
            w.join(", ")
        );
        println!();
        println!(
            "| shape | problem | backend | threads | median ms | × 1 thread | GFLOP/s | % peak | GB/s K+V | % bw |"
        );
        println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    }

    // Read by the pool's threads outside any scope (`evict_for`): it lives as long as
    // the process.
    let cold: &'static [u8] = Vec::leak(vec![1u8; eviction_bytes()]);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for shape in &opts.shapes {
        let mut data = Data::new(shape, &mut rng);
        for &backend in &opts.backends {
            let mut attn = Attention::new().backend(backend);
            if shape.causal {
                attn = attn.causal();
            }
            let attns: Vec<Attention> = opts.threads.iter().map(|&t| attn.threads(t)).collect();
            let times = time_calls(
                opts.budget,
                &mut data,
                attns.len(),
                // Flush first: the read after it (on every thread) leaves the pool's
                // threads awake when the call starts (flushing 32 MiB takes
                // milliseconds, long enough for them to park again), and the TLB
                // without K/V's pages, as after a model's other layers.
                |data, i| {
                    data.flush();
                    evict_for(opts.threads[i], cold);
                },
                |data, i| data.forward(shape, &attns[i]),
            );
            assert!(
                data.o.get().iter().all(|x| x.is_finite()),
                "non-finite output"
            );
            // The median of one thread, when it ran, for the speedups.
            let one = opts.threads.iter().position(|&t| t == 1);
            let one = one.map(|i| times[i].median_ms);
            for (&threads, t) in opts.threads.iter().zip(&times) {
                let speedup = one.map(|o| o / t.median_ms);
                let secs = t.median_ms / 1e3;
                let gflops = shape.flops() / secs / 1e9;
                let pct_peak = 100.0 * gflops / (threads as f64 * peak[&backend]);
                let gbps = shape.kv_bytes() / secs / 1e9;
                let pct_bw = 100.0 * gbps / bw[&threads];
                if opts.json {
                    println!(
                        "{{\"shape\": \"{}\", \"backend\": \"{}\", \"threads\": {threads}, \
                         \"median_ms\": {:.4}, \"min_ms\": {:.4}, \"reps\": {}, \
                         \"gflops\": {gflops:.2}, \"pct_peak\": {pct_peak:.1}, \
                         \"gbps\": {gbps:.2}, \"pct_bw\": {pct_bw:.1}, \"speedup\": {}}}",
                        shape.name,
                        backend.name(),
                        t.median_ms,
                        t.min_ms,
                        t.reps,
                        speedup.map_or("null".to_string(), |x| format!("{x:.3}"))
                    );
                } else {
                    println!(
                        "| {} | {} | {} | {threads} | {:.3} | {} | {gflops:.1} | {pct_peak:.0} % | {gbps:.2} | {pct_bw:.0} % |",
                        shape.name,
                        shape.describe(),
                        backend.name(),
                        t.median_ms,
                        speedup.map_or("–".to_string(), |x| format!("{x:.2}×")),
                    );
                }
            }
        }
    }
    if !opts.json {
        println!();
        println!(
            "FLOPs = 4·b·hq·d·visible pairs; % peak vs threads × one-core peak of the backend; \
             GB/s = K+V bytes once per kv head / median time; % bw vs the measured bandwidth \
             at that thread count. K/V are evicted from cache before every timed call. \
             Total {:.0} s.",
            started.elapsed().as_secs_f64()
        );
    }
}
