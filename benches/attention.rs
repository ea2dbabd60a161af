//! Criterion benches: the four anchor shapes × every available backend × 1 thread / all
//! cores.
//!
//! ```text
//! cargo bench                                  # full run
//! cargo bench --benches -- --quick --noplot    # smoke run, ~1-2 minutes
//! cargo bench -- 'b_gqa.*/avx512'              # one shape and backend
//! cargo test --benches                         # every bench once (scalar: c and d only)
//! ```
//!
//! Throughput is `Throughput::Elements(flops)`, so criterion's "elem/s" column reads as
//! **FLOP/s** (`Gelem/s` = GFLOP/s), with FLOPs = 4·b·hq·d·(visible query/key pairs).
//! For physical limits (% of FMA peak, % of DRAM bandwidth) run
//! `cargo run --release --example bench`.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use flashcpu::{Attention, Backend, Tensor, TensorMut};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::hint::black_box;
use std::time::Duration;

/// `(id, b, sq, skv, hq, hkv, d, causal)`
type Shape = (&'static str, usize, usize, usize, usize, usize, usize, bool);

const SHAPES: [Shape; 4] = [
    ("a_mha_h8_s1024_d128", 1, 1024, 1024, 8, 8, 128, false),
    (
        "b_gqa_causal_h32_kv8_s2048_d128",
        1,
        2048,
        2048,
        32,
        8,
        128,
        true,
    ),
    (
        "c_decode_h32_kv8_skv4096_d128",
        1,
        1,
        4096,
        32,
        8,
        128,
        true,
    ),
    ("d_mha_h12_s512_d64", 1, 512, 512, 12, 12, 64, false),
];

fn flops(&(_, b, sq, skv, hq, _, d, causal): &Shape) -> u64 {
    let pairs: u64 = if causal {
        (0..sq)
            .map(|i| (i + skv).saturating_sub(sq).saturating_add(1).min(skv) as u64)
            .sum()
    } else {
        (sq * skv) as u64
    };
    4 * (b * hq * d) as u64 * pairs
}

fn thread_counts() -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg!(feature = "rayon") && cores > 1 {
        vec![1, cores]
    } else {
        vec![1]
    }
}

fn attention(c: &mut Criterion) {
    // `cargo test --benches` runs each bench once, without `--bench`: there the scalar
    // backend (4-5× slower) skips the two big prefill shapes, to keep the run to seconds.
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let mut rng = StdRng::seed_from_u64(7);
    for shape in &SHAPES {
        let &(id, b, sq, skv, hq, hkv, d, causal) = shape;
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let q = random(b * sq * hq * d);
        let k = random(b * skv * hkv * d);
        let v = random(b * skv * hkv * d);
        let mut o = vec![0.0f32; b * sq * hq * d];

        let mut group = c.benchmark_group(id);
        // 10 samples in ~1 s (also the cap of a `--quick` run); the ~0.1-2.6 s prefill
        // calls of shape b take one call per sample instead.
        group
            .throughput(Throughput::Elements(flops(shape)))
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        if flops(shape) > 10_000_000_000 {
            group.sampling_mode(SamplingMode::Flat);
        }
        for backend in Backend::available() {
            if test_mode && backend == Backend::Scalar && flops(shape) > 4_000_000_000 {
                continue;
            }
            for threads in thread_counts() {
                let mut attn = Attention::new().backend(backend);
                if causal {
                    attn = attn.causal();
                }
                // Called from the bench's thread, as an engine's own thread would call:
                // for more than 1 thread, tasks on rayon's global pool (one thread per
                // core) join it. (Inside `ThreadPool::install` the caller would sleep
                // while a pool thread is woken to make the call.)
                attn = attn.threads(threads);
                let mut call = || {
                    let qt = Tensor::bshd(&q, [b, sq, hq, d]).unwrap();
                    let kt = Tensor::bshd(&k, [b, skv, hkv, d]).unwrap();
                    let vt = Tensor::bshd(&v, [b, skv, hkv, d]).unwrap();
                    let mut ot = TensorMut::bshd(&mut o, [b, sq, hq, d]).unwrap();
                    attn.forward(black_box(qt), kt, vt, &mut ot).unwrap();
                };
                let bench_id = BenchmarkId::new(backend.name(), format!("t{threads}"));
                group.bench_function(bench_id, |bench| bench.iter(&mut call));
            }
        }
        group.finish();
    }
}

fn main() {
    eprintln!(
        "flashcpu benches: throughput in elem/s means FLOP/s (1 element = 1 FLOP; \
         FLOPs = 4·b·hq·d·visible pairs)"
    );
    // 10k bootstrap resamples (not 100k): plenty for 10 samples, and quick to analyse.
    let mut c = Criterion::default()
        .nresamples(10_000)
        .configure_from_args();
    attention(&mut c);
    c.final_summary();
}
