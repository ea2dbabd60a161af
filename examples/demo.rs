//! The main job: `cargo run --release --example demo [-- --all-backends]`.
//!
//! On seeded random data it runs, for the detected backend (or every available one with
//! `--all-backends`):
//! 1. a GQA causal prefill, B1 Hq32 Hkv8 S512 D128, and
//! 2. a decode step, B1 Hq32 Hkv8 Sq1 Skv4096 D128,
//!
//! timing each call (median of several runs, on 1 thread and on all cores), and checks
//! every output of both against the f64 reference in `flashcpu::reference` (a second or
//! two; `Problem::views` can restrict the check to some kv groups for bigger problems).
//! Then it checks a sweep of small
//! odd shapes and features (softcap, sliding window, ALiBi, sinks, bias, custom scale,
//! LSE, bf16/f16 K/V, BHSD layout, V aliasing K) on **every** available backend.
//!
//! It exits non-zero if any error exceeds `1e-4·(1 + max|v|)` (LSE: `1e-4·(1 + max|lse|)`),
//! or if the 1-thread and all-cores outputs are not bit-identical.

use flashcpu::{Attention, Backend, Bias, Element, Tensor, TensorMut, bf16, f16, reference};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::process::ExitCode;
use std::time::Instant;

/// Output error tolerance for values `v`: `1e-4·(1 + max|v|)`.
fn tolerance<T: Element>(v: &[T]) -> f64 {
    1e-4 * (1.0
        + v.iter()
            .map(|x| x.to_f32().abs() as f64)
            .fold(0.0, f64::max))
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Median wall time of `runs` calls, in seconds (after one warm-up call).
fn median_secs(runs: usize, mut call: impl FnMut()) -> f64 {
    call();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            call();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// Query/key pairs visible under the bottom-right causal mask.
fn causal_pairs(sq: usize, skv: usize) -> u64 {
    (0..sq)
        .map(|i| (i + skv).saturating_sub(sq).saturating_add(1).min(skv) as u64)
        .sum()
}

/// A dense f32 problem `[b, sq, hq, d]` × `[b, skv, hkv, d]`, causal.
struct Problem {
    name: &'static str,
    b: usize,
    sq: usize,
    skv: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Problem {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        rng: &mut StdRng,
        b: usize,
        sq: usize,
        skv: usize,
        hq: usize,
        hkv: usize,
        d: usize,
    ) -> Problem {
        Problem {
            name,
            b,
            sq,
            skv,
            hq,
            hkv,
            d,
            q: random(rng, b * sq * hq * d),
            k: random(rng, b * skv * hkv * d),
            v: random(rng, b * skv * hkv * d),
        }
    }

    fn flops(&self) -> f64 {
        4.0 * (self.b * self.hq * self.d) as f64 * causal_pairs(self.sq, self.skv) as f64
    }

    /// Q, K and V restricted to kv heads `g0..g1` (and their query heads): the same
    /// problem for those heads, since kv groups are independent.
    fn views<'p>(&'p self, g0: usize, g1: usize) -> [Tensor<'p, f32>; 3] {
        let (group, d) = (self.hq / self.hkv, self.d);
        // Heads h0..h1 of a contiguous [b, s, h, d] buffer.
        let view = |buf: &'p [f32], s: usize, h: usize, h0: usize, h1: usize| {
            Tensor::from_strides(
                &buf[h0 * d..],
                [self.b, s, h1 - h0, d],
                [s * h * d, h * d, d, 1],
            )
            .unwrap()
        };
        let q = view(&self.q, self.sq, self.hq, g0 * group, g1 * group);
        let k = view(&self.k, self.skv, self.hkv, g0, g1);
        let v = view(&self.v, self.skv, self.hkv, g0, g1);
        [q, k, v]
    }

    fn forward(&self, attn: &Attention, o: &mut [f32]) {
        let [q, k, v] = self.views(0, self.hkv);
        let mut ot = TensorMut::bshd(o, [self.b, self.sq, self.hq, self.d]).unwrap();
        attn.forward(q, k, v, &mut ot).unwrap();
    }
}

/// The f64 reference for kv heads `g0..` (and their query heads).
struct GroupRef {
    g0: usize,
    r: reference::Reference,
}

fn reference_groups(p: &Problem, groups: &[(usize, usize)]) -> Vec<GroupRef> {
    groups
        .iter()
        .map(|&(g0, g1)| {
            let [q, k, v] = p.views(g0, g1);
            let r = reference::attention(&Attention::new().causal(), q, k, v).unwrap();
            GroupRef { g0, r }
        })
        .collect()
}

/// Max |o - reference| over the checked groups of `o` (`[b, sq, hq, d]`).
fn max_error(p: &Problem, o: &[f32], refs: &[GroupRef]) -> f64 {
    let group = p.hq / p.hkv;
    let mut err = 0.0f64;
    for GroupRef { g0, r } in refs {
        let [_, _, rh, _] = r.shape;
        for b in 0..p.b {
            for i in 0..p.sq {
                for h in 0..rh {
                    let oh = g0 * group + h;
                    let row = &o[((b * p.sq + i) * p.hq + oh) * p.d..][..p.d];
                    for (c, &x) in row.iter().enumerate() {
                        err = err.max((x as f64 - r.out_at(b, i, h, c)).abs());
                    }
                }
            }
        }
    }
    err
}

/// Times and checks one problem on `backends`; returns false on failure.
fn run_problem(
    p: &Problem,
    backends: &[Backend],
    checked: &str,
    groups: &[(usize, usize)],
) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tol = tolerance(&p.v);
    let runs = if p.sq == 1 { 21 } else { 5 };
    println!(
        "{}: B{} Hq{} Hkv{} Sq{} Skv{} D{} causal, {:.3} GFLOP, K+V {:.1} MiB",
        p.name,
        p.b,
        p.hq,
        p.hkv,
        p.sq,
        p.skv,
        p.d,
        p.flops() / 1e9,
        (p.k.len() + p.v.len()) as f64 * 4.0 / (1 << 20) as f64
    );
    let t = Instant::now();
    let refs = reference_groups(p, groups);
    let ref_secs = t.elapsed().as_secs_f64();
    println!(
        "  checked against the f64 reference ({ref_secs:.1} s) on {checked}; tolerance {tol:.1e}"
    );
    let mut ok = true;
    for &backend in backends {
        let attn = Attention::new().causal().backend(backend);
        let n = p.b * p.sq * p.hq * p.d;
        let mut o1 = vec![f32::NAN; n];
        let mut on = vec![f32::NAN; n];
        let t1 = median_secs(runs, || p.forward(&attn.threads(1), &mut o1));
        let tn = median_secs(runs, || p.forward(&attn, &mut on));
        let err = max_error(p, &o1, &refs);
        let same = o1.iter().zip(&on).all(|(a, b)| a.to_bits() == b.to_bits());
        let pass = err <= tol && same;
        ok &= pass;
        println!(
            "  {:7} 1 thread {:8.3} ms {:6.1} GFLOP/s | {cores} threads {:8.3} ms {:6.1} GFLOP/s | \
             max err {err:.2e} {} | threads bit-identical: {}",
            backend.name(),
            t1 * 1e3,
            p.flops() / t1 / 1e9,
            tn * 1e3,
            p.flops() / tn / 1e9,
            if err <= tol { "ok" } else { "FAIL" },
            if same { "yes" } else { "NO (FAIL)" },
        );
    }
    ok
}

/// Max output and LSE errors of one forward (default threads) against the reference, the
/// LSE tolerance, and whether 1 thread gives bit-identical output and LSE.
fn errors<Q: Element, KV: Element>(
    attn: &Attention,
    q: Tensor<'_, Q>,
    k: Tensor<'_, KV>,
    v: Tensor<'_, KV>,
) -> (f64, f64, f64, bool) {
    let [b, sq, hq, _] = q.shape();
    let dv = v.shape()[3];
    let r = reference::attention(attn, q, k, v).unwrap();
    let run = |threads: usize| {
        let mut o = vec![f32::NAN; b * sq * hq * dv];
        let mut lse = vec![f32::NAN; b * hq * sq];
        attn.threads(threads)
            .forward_with_lse(
                q,
                k,
                v,
                &mut TensorMut::bshd(&mut o, [b, sq, hq, dv]).unwrap(),
                &mut lse,
            )
            .unwrap();
        (o, lse)
    };
    let (o, lse) = run(0);
    let (o1, lse1) = run(1);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let same = bits(&o) == bits(&o1) && bits(&lse) == bits(&lse1);
    let err = o
        .iter()
        .zip(&r.out)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max);
    let lerr = lse
        .iter()
        .zip(&r.lse)
        .map(|(&x, &y)| {
            if y == f64::NEG_INFINITY || x == f32::NEG_INFINITY {
                if x as f64 == y { 0.0 } else { f64::INFINITY }
            } else {
                (x as f64 - y).abs()
            }
        })
        .fold(0.0, f64::max);
    let lmax = r
        .lse
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    (err, lerr, 1e-4 * (1.0 + lmax), same)
}

/// `(b, sq, skv, hq, hkv, d_qk, d_v, causal)`
type SweepShape = (usize, usize, usize, usize, usize, usize, usize, bool);

/// Small odd shapes × feature variants on every backend; returns false on failure.
fn feature_sweep(rng: &mut StdRng, backends: &[Backend]) -> bool {
    let shapes: [SweepShape; 8] = [
        (1, 1, 1, 1, 1, 1, 1, false),
        (2, 37, 53, 8, 2, 17, 33, true),
        (1, 130, 70, 4, 4, 128, 128, true), // sq > skv: the first rows see no key
        (1, 1, 300, 32, 8, 128, 128, false),
        (1, 5, 3, 2, 1, 3, 5, true),
        (1, 67, 67, 6, 1, 64, 64, true),   // MQA
        (1, 1, 2000, 8, 2, 64, 64, false), // long KV, few groups: split-KV
        (2, 3, 1500, 4, 4, 32, 48, true),
    ];
    let mut worst = vec![(0.0f64, 0.0f64, true); backends.len()];
    let mut cases = 0;
    for &(b, sq, skv, hq, hkv, dk, dv, causal) in &shapes {
        let q = random(rng, b * sq * hq * dk);
        let k = random(rng, b * skv * hkv * dk.max(dv));
        let v = random(rng, b * skv * hkv * dv);
        let bias = random(rng, b * hq * sq * skv);
        let slopes: Vec<f32> = (0..hq).map(|h| 0.1 * h as f32).collect();
        let sinks: Vec<f32> = (0..hq).map(|h| h as f32 * 0.3).collect();
        let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
        let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let tol = tolerance(&v).max(tolerance(&k));
        let kd = dk.max(dv);
        // K is stored with head dim max(d_qk, d_v) so V can alias its first d_v columns.
        let kt =
            Tensor::from_strides(&k, [b, skv, hkv, dk], [skv * hkv * kd, hkv * kd, kd, 1]).unwrap();
        let vt = Tensor::bshd(&v, [b, skv, hkv, dv]).unwrap();
        let qt = Tensor::bshd(&q, [b, sq, hq, dk]).unwrap();
        let bias_t = Bias::new(&bias, [b, hq, sq, skv]).unwrap();
        let base = if causal {
            Attention::new().causal()
        } else {
            Attention::new()
        };
        let variants: [(&str, Attention); 6] = [
            ("plain", base),
            ("softcap+window", base.softcap(3.0).window(7, 2)),
            ("alibi+sinks", base.alibi(&slopes).sinks(&sinks)),
            ("bias+scale", base.bias(bias_t).scale(3.0)),
            ("window(0,0)", base.window(0, 0)),
            (
                "all",
                base.softcap(5.0)
                    .window(9, 0)
                    .alibi(&slopes)
                    .bias(bias_t)
                    .sinks(&sinks),
            ),
        ];
        for (bi, &backend) in backends.iter().enumerate() {
            let mut note = |(e, l, ltol, same): (f64, f64, f64, bool), what: &str| {
                cases += 1;
                let w = &mut worst[bi];
                w.0 = w.0.max(e / tol);
                w.1 = w.1.max(l / ltol);
                if e > tol || l > ltol || !same {
                    w.2 = false;
                    println!(
                        "  FAIL {} {:?} {what}: err {e:.2e} (tol {tol:.1e}), lse err {l:.2e} \
                         (tol {ltol:.1e}), 1 thread bit-identical: {same}",
                        backend.name(),
                        (b, sq, skv, hq, hkv, dk, dv, causal)
                    );
                }
            };
            for (name, a) in &variants {
                note(errors(&a.backend(backend), qt, kt, vt), name);
            }
            let a = base.backend(backend);
            // f16 / bf16 K and V with f32 Q and O (the reference reads the same values).
            let k16t = Tensor::bshd(&k16, [b, skv, hkv, kd]).unwrap();
            let v16t = Tensor::bshd(&v16, [b, skv, hkv, dv]).unwrap();
            let q2 = Tensor::bshd(&q, [b, sq, hq, dk]).unwrap();
            if dk == kd {
                note(errors(&a, q2, k16t, v16t), "f16 kv");
                let kbt = Tensor::bshd(&kb, [b, skv, hkv, kd]).unwrap();
                let vbt = Tensor::bshd(&vb, [b, skv, hkv, dv]).unwrap();
                note(errors(&a, q2, kbt, vbt), "bf16 kv");
                // BHSD (PyTorch) layout: the same buffers read as [b, h, s, d].
                let qh = Tensor::bhsd(&q, [b, hq, sq, dk]).unwrap();
                let kh = Tensor::bhsd(&k, [b, hkv, skv, dk]).unwrap();
                let vh = Tensor::bhsd(&v, [b, hkv, skv, dv]).unwrap();
                note(errors(&a, qh, kh, vh), "bhsd");
            }
            if dv <= dk {
                // V = the first d_v columns of K (DeepSeek MLA).
                let va = Tensor::from_strides(&k, [b, skv, hkv, dv], kt.strides()).unwrap();
                note(errors(&a, qt, kt, va), "v aliases k");
            }
        }
    }
    let mut ok = true;
    for (bi, &backend) in backends.iter().enumerate() {
        let (e, l, pass) = worst[bi];
        ok &= pass;
        println!(
            "  {:7} worst err / tol {e:.3}, worst lse err / tol {l:.3} {}",
            backend.name(),
            if pass { "ok" } else { "FAIL" }
        );
    }
    println!(
        "  ({cases} cases, each run on all cores and on 1 thread: outputs and LSE bit-identical)"
    );
    ok
}

fn main() -> ExitCode {
    let mut all = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--all-backends" => all = true,
            "-h" | "--help" => {
                println!("usage: demo [--all-backends]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: demo [--all-backends]");
                return ExitCode::from(2);
            }
        }
    }
    let detected = Backend::detect();
    let available = Backend::available();
    let backends = if all {
        available.clone()
    } else {
        vec![detected]
    };
    let names: Vec<&str> = available.iter().map(|b| b.name()).collect();
    println!(
        "flashcpu demo: detected backend {} (available: {}), {} cores",
        detected.name(),
        names.join(", "),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rng = StdRng::seed_from_u64(2024);
    let mut ok = true;

    println!();
    let prefill = Problem::new("GQA causal prefill", &mut rng, 1, 512, 512, 32, 8, 128);
    ok &= run_problem(
        &prefill,
        &backends,
        "every output (32 heads × 512 rows × 128 columns)",
        &[(0, 8)],
    );

    println!();
    let decode = Problem::new("decode step", &mut rng, 1, 1, 4096, 32, 8, 128);
    ok &= run_problem(&decode, &backends, "every output", &[(0, 8)]);

    println!();
    println!(
        "feature sweep on every available backend (8 odd shapes × softcap, window, ALiBi, \
         sinks, bias, scale, f16/bf16 K/V, BHSD, V aliasing K; output and LSE):"
    );
    ok &= feature_sweep(&mut rng, &available);

    println!();
    if ok {
        println!("PASS");
        ExitCode::SUCCESS
    } else {
        println!("FAIL");
        ExitCode::FAILURE
    }
}
