//! flashcpu vs candle on one thread, f32, one criterion group per shape:
//!
//! - `flashcpu_<backend>`: `Attention::new().backend(Backend::detect()).threads(1)`;
//! - `candle_flash_attn`: `candle_nn::attention::flash_attn::<f32>` (CPU kernels);
//! - `candle_naive`: `softmax_last_dim(q.matmul(kᵀ)·scale + mask).matmul(v)`.
//!
//! ```text
//! cargo bench --manifest-path compare/Cargo.toml                 # everything, ~4-5 min
//! cargo bench --manifest-path compare/Cargo.toml -- s16          # one shape
//! ```
//!
//! Throughput is `Throughput::Elements(flops)`: criterion's `Gelem/s` reads as GFLOP/s
//! (4·b·hq·d per visible query/key pair, the same count for all three).
//!
//! Before a shape is timed, each candle output is checked against flashcpu's
//! (max |diff| < 1e-3) and each implementation's process CPU time / wall time is checked
//! to be about 1 (one busy thread).

use criterion::{Criterion, SamplingMode, Throughput};
use flashcpu::Backend;
use flashcpu_compare::{Inputs, SHAPES, Shape, bhsd_to_bshd, cpu_per_wall, max_abs_diff};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::hint::black_box;
use std::sync::Once;
use std::time::Duration;

const TOLERANCE: f32 = 1e-3;
/// A single-threaded run uses at most one core; leave room for tick rounding.
const MAX_CPU_PER_WALL: f64 = 1.3;

fn check(inputs: &Inputs, backend: Backend) {
    let id = inputs.shape.id;
    let mut o = vec![0.0f32; inputs.shape.q_len()];
    inputs.flashcpu(backend, &mut o);
    for (name, out) in [
        ("candle_flash_attn", inputs.candle_flash()),
        ("candle_naive", inputs.candle_naive()),
    ] {
        let out = bhsd_to_bshd(&out.unwrap_or_else(|e| panic!("{id}: {name} failed: {e}")))
            .unwrap_or_else(|e| panic!("{id}: {name} output: {e}"));
        let diff = max_abs_diff(&o, &out);
        assert!(
            diff < TOLERANCE,
            "{id}: {name} disagrees with flashcpu: max |diff| = {diff:e} >= {TOLERANCE:e} \
             (layout or mask convention mismatch?)"
        );
        eprintln!("{id}: {name} matches flashcpu_{backend} (max |diff| {diff:.1e})");
    }

    let ratios = [
        (
            "flashcpu",
            cpu_per_wall(0.3, || inputs.flashcpu(backend, &mut o)),
        ),
        (
            "candle_flash_attn",
            cpu_per_wall(0.3, || drop(inputs.candle_flash().unwrap())),
        ),
        (
            "candle_naive",
            cpu_per_wall(0.3, || drop(inputs.candle_naive().unwrap())),
        ),
    ];
    for (name, ratio) in ratios {
        let Some((ratio, calls)) = ratio else {
            continue;
        };
        eprintln!("{id}: {name} cpu/wall {ratio:.2} over {calls} call(s)");
        assert!(
            ratio < MAX_CPU_PER_WALL,
            "{id}: {name} used {ratio:.2} cores: it is not single-threaded"
        );
    }
}

fn peers(c: &mut Criterion) {
    let backend = Backend::detect();
    eprintln!(
        "flashcpu backend {backend}; candle-core/candle-nn 0.11 on 1 thread \
         (RAYON_NUM_THREADS=CANDLE_NUM_THREADS=1)"
    );
    let mut rng = StdRng::seed_from_u64(7);
    for shape in SHAPES {
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let Shape { id, .. } = shape;
        let (q, k, v) = (
            random(shape.q_len()),
            random(shape.kv_len()),
            random(shape.kv_len()),
        );
        let inputs = Inputs::new(shape, q, k, v).expect("candle input tensors");
        // Checked on first use, so a criterion filter that skips the shape skips it too.
        let checked = Once::new();
        let check = || checked.call_once(|| check(&inputs, backend));

        let flops = shape.flops();
        let mut group = c.benchmark_group(id);
        group
            .throughput(Throughput::Elements(flops))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        if flops > 1_000_000_000 {
            // Calls of 0.1-5 s: one or a few per sample, not criterion's linear ramp.
            group.sampling_mode(SamplingMode::Flat);
        }
        let mut o = vec![0.0f32; shape.q_len()];
        group.bench_function(format!("flashcpu_{}", backend.name()), |bench| {
            check();
            bench.iter(|| inputs.flashcpu(backend, black_box(&mut o)))
        });
        group.bench_function("candle_flash_attn", |bench| {
            check();
            bench.iter(|| inputs.candle_flash().unwrap())
        });
        group.bench_function("candle_naive", |bench| {
            check();
            bench.iter(|| inputs.candle_naive().unwrap())
        });
        group.finish();
    }
}

fn main() {
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { flashcpu_compare::force_single_thread() };
    let mut c = Criterion::default().configure_from_args();
    peers(&mut c);
    c.final_summary();
}
