//! Scratch is kept across calls (a process-wide pool whose buffers only grow): calls
//! over NaN inputs fill it with NaN first, then every case must still match the f64
//! reference on every backend, bit-identically for every thread count.

use crate::common;

use common::{BiasSpec, Case, DType, Layout, Rng, Sinks, check_with, run, tolerance};
use flashcpu::{Attention, Backend, Tensor, TensorMut};

fn poison(be: Backend) {
    // NaN inputs fill every scratch region a call uses with NaN: multi-head decode with
    // splits, single-head prefill with the panel cache, wide and odd head dims.
    let shapes = [
        (
            1usize, 1usize, 700usize, 16usize, 4usize, 200usize, 200usize,
        ),
        (1, 130, 130, 4, 2, 136, 72),
        (2, 3, 300, 8, 4, 72, 40),
    ];
    for &(b, sq, skv, hq, hkv, dqk, dv) in &shapes {
        let q = vec![f32::NAN; b * sq * hq * dqk];
        let k = vec![f32::NAN; b * skv * hkv * dqk];
        let v = vec![f32::NAN; b * skv * hkv * dv];
        let mut o = vec![0.0f32; b * sq * hq * dv];
        let mut lse = vec![0.0f32; b * hq * sq];
        let slopes = vec![1e30f32; hq]; // large, within |slope|·(sq + skv) ≤ f32::MAX / 2
        for threads in [1usize, 0] {
            let mut ov = TensorMut::bshd(&mut o, [b, sq, hq, dv]).unwrap();
            Attention::new()
                .backend(be)
                .threads(threads)
                .alibi(&slopes)
                .forward_with_lse(
                    Tensor::bshd(&q, [b, sq, hq, dqk]).unwrap(),
                    Tensor::bshd(&k, [b, skv, hkv, dqk]).unwrap(),
                    Tensor::bshd(&v, [b, skv, hkv, dv]).unwrap(),
                    &mut ov,
                    &mut lse,
                )
                .unwrap();
        }
    }
}

/// Cases per test: 24, or `FLASHCPU_REUSE_CASES` (the qemu steps of scripts/test.sh run 4).
fn cases_to_run() -> usize {
    std::env::var("FLASHCPU_REUSE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

fn layout(rng: &mut Rng) -> Layout {
    match rng.range(0, 2) {
        0 => Layout::Bshd,
        1 => Layout::Bhsd,
        _ => Layout::Strided {
            order: rng.range(0, 5) as u8,
            row_pad: rng.range(0, 5),
            mid_pad: rng.range(0, 3),
            outer_pad: rng.range(0, 3),
        },
    }
}

fn random_case(rng: &mut Rng, seed: u64) -> Case {
    let hkv = [1usize, 2, 3, 4, 8][rng.range(0, 4)];
    let group = [1usize, 2, 3, 4, 5, 7, 8][rng.range(0, 6)];
    let sq = if rng.chance(0.8) {
        rng.range(1, 4)
    } else {
        rng.range(1, 80)
    };
    let skv = [1usize, 7, 8, 9, 15, 17, 63, 64, 65, 130, 513, 700, 1100][rng.range(0, 12)];
    let dq = [1usize, 3, 8, 16, 17, 24, 32, 48, 64, 72, 100][rng.range(0, 10)];
    let dv = [1usize, 5, 8, 16, 24, 32, 40, 64, 70][rng.range(0, 8)];
    let b = rng.range(1, 3);
    let mut c = Case::new(b, sq, skv, hkv * group, hkv, dq, dv);
    c.seed = seed;
    c.lq = layout(rng);
    c.lk = layout(rng);
    c.lv = layout(rng);
    c.lo = layout(rng);
    c.v_alias_k = rng.chance(0.3);
    let dt = [
        (DType::F32, DType::F32, DType::F32),
        (DType::F32, DType::F32, DType::F32),
        (DType::Bf16, DType::Bf16, DType::F32),
        (DType::F32, DType::F16, DType::F32),
    ][rng.range(0, 3)];
    (c.tq, c.tkv, c.to) = dt;
    c.causal = rng.chance(0.4);
    if rng.chance(0.4) {
        c.window = Some((rng.range(0, 200), rng.range(0, 30)));
    }
    if rng.chance(0.2) {
        c.softcap = Some(5.0);
    }
    if rng.chance(0.2) {
        c.alibi = Some(0.5);
    }
    if rng.chance(0.2) {
        c.bias = Some(BiasSpec {
            neg_inf: 0.1,
            ..BiasSpec::default()
        });
    }
    if rng.chance(0.3) {
        c.sinks = Some(Sinks::Random(2.0));
    }
    c
}

#[test]
fn reused_scratch_random_cases() {
    let n = cases_to_run();
    let mut rng = Rng::new(12345);
    let cases: Vec<Case> = (0..n).map(|i| random_case(&mut rng, i as u64)).collect();
    let mut fails = 0;
    for be in common::backends() {
        for (i, c) in cases.iter().enumerate() {
            let data = c.data();
            let want = data.reference(c);
            let tol = tolerance(c, &data);
            poison(be);
            let mut c1 = c.clone();
            c1.threads = 1;
            let r1 = check_with(&c1, &data, &want, tol, be);
            if let Err(e) = &r1 {
                fails += 1;
                eprintln!("FAIL {be} case {i} threads 1: {e}\n{c1:?}");
            }
            let one = run(&c1, &data, be).unwrap();
            for t in [0usize, 2, 3] {
                let mut ct = c.clone();
                ct.threads = t;
                let got = run(&ct, &data, be).unwrap();
                if got.bits != one.bits
                    || got
                        .lse
                        .as_ref()
                        .map(|l| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                        != one
                            .lse
                            .as_ref()
                            .map(|l| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                {
                    fails += 1;
                    eprintln!("NONDET {be} case {i} threads {t}\n{c:?}");
                }
            }
        }
    }
    assert_eq!(fails, 0);
}

#[test]
fn reused_scratch_multi_head_edges() {
    let mut list = Vec::new();
    for &(skv, w, causal, sq, hkv, group, dq, dv) in &[
        (
            3000usize,
            Some((20usize, 0usize)),
            true,
            1usize,
            8usize,
            4usize,
            64usize,
            64usize,
        ),
        (3000, Some((5, 3)), false, 2, 4, 2, 128, 128),
        (2500, Some((700, 0)), true, 3, 8, 1, 32, 48),
        (2048, None, true, 4, 2, 16, 16, 16),
        (1025, Some((0, 0)), false, 1, 16, 2, 64, 64),
        (520, Some((9, 2)), true, 5, 4, 3, 17, 9),
        (4096, Some((100, 0)), true, 1, 1, 8, 128, 128),
    ] {
        for alias in [false, true] {
            for lk in [Layout::Bshd, Layout::Bhsd] {
                let mut c = Case::new(1, sq, skv, hkv * group, hkv, dq, dv);
                c.window = w;
                c.causal = causal;
                c.v_alias_k = alias;
                c.lk = lk;
                c.lv = lk;
                c.sinks = Some(Sinks::Mixed);
                list.push(c);
            }
        }
    }
    list.truncate(cases_to_run());
    let mut fails = 0;
    for be in common::backends() {
        for c in &list {
            let data = c.data();
            let want = data.reference(c);
            let tol = tolerance(c, &data);
            poison(be);
            for t in [1usize, 0] {
                let mut ct = c.clone();
                ct.threads = t;
                if let Err(e) = check_with(&ct, &data, &want, tol, be) {
                    fails += 1;
                    eprintln!("FAIL {be} t{t}: {e}\n{ct:?}");
                }
            }
        }
    }
    assert_eq!(fails, 0);
}

/// `release_scratch` empties the pool: calls after it (and calls racing with it on other
/// threads) allocate afresh and give the same bits as before.
#[test]
fn released_scratch_gives_the_same_bits() {
    let mut rng = Rng::new(777);
    let cases: Vec<Case> = (0..cases_to_run().min(6))
        .map(|i| random_case(&mut rng, 1000 + i as u64))
        .collect();
    for be in common::backends() {
        for c in &cases {
            let data = c.data();
            poison(be);
            let before = run(c, &data, be).unwrap();
            flashcpu::release_scratch();
            let after = run(c, &data, be).unwrap();
            assert_eq!(before.bits, after.bits, "{be} {c:?}");
            // Releases racing with calls on another thread change nothing either.
            std::thread::scope(|s| {
                let h = s.spawn(|| {
                    (0..3)
                        .map(|_| run(c, &data, be).unwrap().bits)
                        .collect::<Vec<_>>()
                });
                for _ in 0..20 {
                    flashcpu::release_scratch();
                    std::thread::yield_now();
                }
                for bits in h.join().unwrap() {
                    assert_eq!(bits, before.bits, "{be} {c:?}");
                }
            });
        }
    }
}
