//! Partial tiles and the kernel paths around them, against the f64 reference on every
//! backend: causal and window masks whose edges cut Q tiles, slabs and register blocks
//! (the kernel skips QK blocks and PV keys no row of theirs sees), with modifiers, every
//! storage type, GQA, head dims that fill no vector, split-KV decode, bit identity across
//! thread counts, and NaN in Q, K or V around the skipped ranges. (From an independent
//! review of the AVX-512 exp2, slab-major Qᵀ, 8-key K̂ packing and block-skipping changes.)

use crate::common;

use common::{BiasSpec, Case, DType, Sinks, check_sampled, run, sampled};

use flashcpu::Backend;

fn bit_identity(c: &Case) {
    if !sampled(c) {
        return;
    }
    let data = c.data();
    for be in common::backends() {
        let mut c1 = c.clone();
        c1.threads = 1;
        let one = run(&c1, &data, be).unwrap();
        for t in [0usize, 2, 3, 7] {
            let mut ct = c.clone();
            ct.threads = t;
            let got = run(&ct, &data, be).unwrap();
            assert_eq!(got.bits, one.bits, "{be} threads {t}: {c:?}");
            let lb = |o: &common::Outcome| {
                o.lse
                    .as_ref()
                    .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            };
            assert_eq!(lb(&got), lb(&one), "{be} lse threads {t}: {c:?}");
        }
    }
}

type Mask = (bool, Option<(usize, usize)>);

fn masks() -> Vec<Mask> {
    vec![
        (true, None),
        (true, Some((5, 0))),
        (true, Some((40, 3))),
        (false, Some((7, 13))),
        (false, Some((0, 0))),
        (false, Some((usize::MAX, 5))),
        (false, Some((3, usize::MAX))),
        (true, Some((usize::MAX, usize::MAX))),
        (false, Some((17, 0))),
    ]
}

/// Partial tiles with every mask shape, sq < skv, sq > skv, GQA, odd head dims.
#[test]
fn partial_tiles_masks_shapes() {
    let shapes: &[(usize, usize, usize, usize, usize, usize)] = &[
        // (sq, skv, hq, hkv, dqk, dv)
        (37, 150, 6, 2, 20, 12),
        (150, 40, 2, 1, 24, 40),
        (100, 100, 3, 3, 17, 33),
        (45, 90, 10, 2, 3, 8),
        (70, 70, 1, 1, 1, 1),
        (9, 300, 4, 1, 48, 32),
        (200, 130, 1, 1, 16, 16),
        (13, 13, 8, 1, 40, 24),
    ];
    for &(sq, skv, hq, hkv, dqk, dv) in shapes {
        for (causal, window) in masks() {
            let mut c = Case::new(1, sq, skv, hq, hkv, dqk, dv);
            c.causal = causal;
            c.window = window;
            c.seed = (sq * 7 + skv * 13 + dqk) as u64;
            check_sampled(&c);
        }
    }
}

/// The same with bit identity across thread counts (a subset, to keep it short).
#[test]
fn partial_tiles_bit_identity() {
    for &(sq, skv, hq, hkv, d, dv) in &[
        (150usize, 260usize, 4usize, 1usize, 20usize, 36usize),
        (250, 90, 2, 2, 64, 64),
        (3, 2300, 8, 1, 32, 24),
        (1, 3000, 8, 2, 32, 32),
    ] {
        for (causal, window) in [
            (true, None),
            (false, Some((30usize, 9usize))),
            (true, Some((100, 0))),
        ] {
            let mut c = Case::new(1, sq, skv, hq, hkv, d, dv);
            c.causal = causal;
            c.window = window;
            c.sinks = Some(Sinks::Mixed);
            check_sampled(&c);
            bit_identity(&c);
        }
    }
}

/// Modifiers and storage types combined with partial masks.
#[test]
fn partial_tiles_modifiers_and_types() {
    for (k, &(tq, tkv, to)) in common::DTYPES.iter().enumerate() {
        for (causal, window) in [
            (true, None),
            (true, Some((20usize, 0usize))),
            (false, Some((9, 4))),
        ] {
            let mut c = Case::new(2, 60, 110, 6, 3, 40, 24);
            c.causal = causal;
            c.window = window;
            c.tq = tq;
            c.tkv = tkv;
            c.to = to;
            c.seed = 100 + k as u64;
            match k % 4 {
                0 => c.softcap = Some(5.0),
                1 => c.alibi = Some(0.5),
                2 => {
                    c.bias = Some(BiasSpec {
                        neg_inf: 0.2,
                        neg_inf_rows: 0.05,
                        ..BiasSpec::default()
                    })
                }
                _ => {
                    c.softcap = Some(3.0);
                    c.alibi = Some(0.2);
                    c.bias = Some(BiasSpec {
                        heads_1: true,
                        neg_inf: 0.1,
                        ..BiasSpec::default()
                    });
                    c.sinks = Some(Sinks::Mixed);
                }
            }
            check_sampled(&c);
        }
    }
}

/// Q tiles whose rows span several Q tiles (GQA packing: rows are position-major),
/// larger head dims (slab transposes with full 16x16 blocks and 8-row tails).
#[test]
fn multi_q_tile_gqa() {
    for &(sq, hq, hkv, d, dv) in &[
        (100usize, 8usize, 2usize, 64usize, 64usize),
        (77, 12, 3, 72, 40),
        (50, 16, 1, 128, 128),
        (41, 6, 6, 96, 48),
    ] {
        for (causal, window) in [
            (true, None),
            (true, Some((30usize, 0usize))),
            (false, Some((12, 12))),
        ] {
            let mut c = Case::new(1, sq, 160, hq, hkv, d, dv);
            c.causal = causal;
            c.window = window;
            check_sampled(&c);
        }
    }
}

/// Runs a case with data modified by `edit` and checks NaN rows against the reference
/// (NaN rows: every output NaN and LSE NaN; others within tolerance).
fn check_nan_case(c: &Case, edit: &dyn Fn(&mut common::Data)) -> usize {
    if !sampled(c) {
        return 0;
    }
    let mut data = c.data();
    let tol = common::tolerance(c, &data);
    edit(&mut data);
    let want = data.reference(c);
    let mut nan_rows = 0;
    for be in common::backends() {
        for threads in [1usize, 0, 3] {
            let mut ct = c.clone();
            ct.threads = threads;
            let got = run(&ct, &data, be).unwrap();
            let lse = got.lse.as_ref().unwrap();
            nan_rows = 0;
            for b in 0..c.b {
                for i in 0..c.sq {
                    for h in 0..c.hq {
                        let rl = want.lse_at(b, h, i);
                        let gl = lse[(b * c.hq + h) * c.sq + i];
                        let ctx = format!("{be} t{threads} row (b{b}, i{i}, h{h}) case {c:?}");
                        let row = &got.out[((b * c.sq + i) * c.hq + h) * c.dv..][..c.dv];
                        if rl.is_nan() {
                            nan_rows += 1;
                            assert!(gl.is_nan(), "lse {gl} should be NaN: {ctx}");
                            assert!(row.iter().all(|x| x.is_nan()), "out not NaN: {ctx}");
                            continue;
                        }
                        assert!(!gl.is_nan(), "lse NaN, reference {rl}: {ctx}");
                        if rl == f64::NEG_INFINITY {
                            assert_eq!(gl, f32::NEG_INFINITY, "{ctx}");
                            assert!(row.iter().all(|x| *x == 0.0), "{ctx}");
                            continue;
                        }
                        assert!(
                            (gl as f64 - rl).abs() <= tol.lse_abs + tol.lse_rel * rl.abs(),
                            "lse {gl} vs {rl}: {ctx}"
                        );
                        for (e, &x) in row.iter().enumerate() {
                            let w = want.out_at(b, i, h, e);
                            assert!(
                                (x - w).abs() <= tol.out_abs + tol.out_rel * w.abs(),
                                "out c{e} {x} vs {w}: {ctx}"
                            );
                        }
                    }
                }
            }
        }
    }
    nan_rows
}

fn set_k(c: &Case, data: &mut common::Data, b: usize, j: usize, g: usize, e: usize, x: f32) {
    let s = data.ks;
    assert!(j < c.skv && g < c.hkv && e < c.dqk);
    data.k[b * s[0] + j * s[1] + g * s[2] + e * s[3]] = x;
}

fn set_q(c: &Case, data: &mut common::Data, b: usize, i: usize, h: usize, e: usize, x: f32) {
    let s = data.qs;
    assert!(i < c.sq && h < c.hq && e < c.dqk);
    data.q[b * s[0] + i * s[1] + h * s[2] + e * s[3]] = x;
}

/// A NaN in K at various keys under every mask: rows that see it are NaN, the others
/// match the reference.
#[test]
fn nan_in_k_under_partial_masks() {
    let shapes: &[(usize, usize, usize, usize, usize)] = &[
        // (sq, skv, hq, hkv, d)
        (40, 130, 4, 2, 20),
        (130, 50, 2, 1, 16),
        (1, 3000, 8, 1, 32),
        (3, 2500, 8, 2, 24),
        (70, 70, 1, 1, 8),
        (200, 200, 2, 1, 64),
    ];
    for &(sq, skv, hq, hkv, d) in shapes {
        for (causal, window) in masks() {
            for &j in &[0usize, skv / 3, skv / 2 + 1, skv - 1] {
                let mut c = Case::new(1, sq, skv, hq, hkv, d, d);
                c.causal = causal;
                c.window = window;
                c.seed = (j + sq) as u64;
                check_nan_case(&c, &|data: &mut common::Data| {
                    set_k(&c, data, 0, j, hkv - 1, d / 2, f32::NAN);
                });
            }
        }
    }
}

/// NaN in K with modifiers (bias with -inf, softcap, alibi, sinks).
#[test]
fn nan_in_k_with_modifiers() {
    for (causal, window) in masks().into_iter().take(5) {
        for k in 0..3 {
            let mut c = Case::new(1, 50, 120, 4, 2, 24, 24);
            c.causal = causal;
            c.window = window;
            c.sinks = Some(Sinks::Mixed);
            match k {
                0 => c.softcap = Some(4.0),
                1 => c.alibi = Some(0.3),
                _ => {
                    c.bias = Some(BiasSpec {
                        neg_inf: 0.3,
                        ..BiasSpec::default()
                    })
                }
            }
            check_nan_case(&c, &|data: &mut common::Data| {
                set_k(&c, data, 0, 77, 0, 5, f32::NAN);
                set_k(&c, data, 0, 3, 1, 0, f32::NAN);
            });
        }
    }
}

/// NaN in Q, including rows that see no key (the reference gives 0 / -inf there).
#[test]
fn nan_in_q_rows() {
    for &(sq, skv, hq, hkv, d) in &[
        (100usize, 30usize, 4usize, 2usize, 16usize),
        (30, 130, 4, 1, 20),
        (1, 2600, 8, 1, 32),
    ] {
        for (causal, window) in masks() {
            let mut c = Case::new(1, sq, skv, hq, hkv, d, d);
            c.causal = causal;
            c.window = window;
            check_nan_case(&c, &|data: &mut common::Data| {
                set_q(&c, data, 0, 0, 0, 1, f32::NAN);
                set_q(&c, data, 0, sq / 2, hq - 1, d - 1, f32::NAN);
                set_q(&c, data, 0, sq - 1, 1 % hq, 0, f32::NAN);
            });
        }
    }
}

/// README: "Keys that no row of a PV block (a few query rows) sees under the causal mask
/// or a window are skipped, so a non-finite V row there cannot reach them." Rows far from
/// the key (more than 16 rows away from any row that sees it) must stay finite.
#[test]
fn nan_v_outside_span_does_not_reach() {
    for &(sq, skv, hq, hkv, d, causal, window, j) in &[
        (
            200usize, 200usize, 1usize, 1usize, 16usize, true, None, 190usize,
        ),
        (200, 200, 1, 1, 16, true, None, 100),
        (120, 300, 2, 2, 24, true, None, 290),
        (100, 100, 1, 1, 16, false, Some((5usize, 5usize)), 50),
        (100, 100, 1, 1, 16, true, Some((10, 0)), 20),
        (1, 500, 4, 1, 32, true, Some((37, 0)), 100),
        (1, 3000, 8, 1, 32, true, Some((200, 0)), 1000),
        (2, 3000, 8, 1, 32, true, Some((200, 0)), 1000),
    ] {
        let mut c = Case::new(1, sq, skv, hq, hkv, d, d);
        c.causal = causal;
        c.window = window;
        let mut data = c.data();
        {
            let s = data.vs;
            let v = data.v.as_mut().unwrap();
            for e in 0..d {
                v[j * s[1] + e * s[3]] = f32::NAN;
            }
        }
        let skv_i = skv as i64;
        for be in common::backends() {
            let got = run(&c, &data, be).unwrap();
            for i in 0..sq {
                let pos = i as i64 + skv_i - sq as i64;
                // Distance in positions from the nearest row that sees key j.
                let sees = |p: i64| {
                    let jj = j as i64;
                    let mut vis = !(causal && jj > p);
                    if let Some((l, r)) = window {
                        vis &= jj >= p.saturating_sub(l as i64) && jj <= p.saturating_add(r as i64);
                    }
                    vis
                };
                let near = (pos - 20..=pos + 20).any(sees);
                if near {
                    continue;
                }
                for h in 0..hq {
                    let row = &got.out[(i * hq + h) * d..][..d];
                    assert!(
                        row.iter().all(|x| x.is_finite()),
                        "{be}: row (i{i}, h{h}) got V NaN from key {j} it does not see: {c:?}"
                    );
                }
            }
        }
    }
}

/// Scratch reuse: calls of different shapes (and one full of NaN) on the same workers,
/// then a call that must match the reference.
#[test]
fn scratch_reuse_after_nan_and_other_shapes() {
    for be in common::backends() {
        let mut big = Case::new(1, 130, 200, 4, 1, 64, 64);
        big.causal = true;
        big.threads = 1;
        let mut dbig = big.data();
        for x in dbig.k.iter_mut() {
            *x = f32::NAN;
        }
        for x in dbig.q.iter_mut() {
            *x = f32::INFINITY;
        }
        let _ = run(&big, &dbig, be).unwrap();
        for &(sq, skv, hq, d, dv) in &[
            (70usize, 64usize, 2usize, 64usize, 32usize),
            (33, 128, 4, 64, 64),
            (5, 200, 4, 60, 20),
        ] {
            for (causal, window) in [(true, None), (false, Some((10usize, 3usize)))] {
                let mut c = Case::new(1, sq, skv, hq, 1, d, dv);
                c.causal = causal;
                c.window = window;
                c.threads = 1;
                let data = c.data();
                let want = data.reference(&c);
                common::check_on(&c, &data, &want, be)
                    .unwrap_or_else(|e| panic!("{be}: {e}\n{c:?}"));
                let _ = run(&big, &dbig, be).unwrap();
            }
        }
    }
}

/// Plain sanity for every backend: head dims that are / are not multiples of 16 with
/// K̂ tiles of 8 keys (block8), f16 K (pack_k of another type), skv not a multiple of 8.
#[test]
fn head_dims_and_tail_keys() {
    for &d in &[1usize, 7, 15, 16, 17, 31, 32, 33, 48, 63, 80, 130] {
        for &skv in &[5usize, 8, 9, 63, 64, 65, 71, 129] {
            let mut c = Case::new(1, 20, skv, 2, 1, d, (d + 5) % 40 + 1);
            c.causal = skv % 2 == 0;
            c.tkv = if d % 2 == 0 { DType::F16 } else { DType::F32 };
            c.seed = (d * 1000 + skv) as u64;
            check_sampled(&c);
        }
    }
}

#[test]
fn backends_list() {
    eprintln!("backends: {:?}", Backend::available());
}

fn random_case(rng: &mut common::Rng, seed: u64) -> Case {
    let group = rng.range(1, 5);
    let hkv = rng.range(1, 3);
    let sq = if rng.chance(0.2) {
        rng.range(1, 4)
    } else {
        rng.range(1, 90)
    };
    let skv = if rng.chance(0.15) {
        rng.range(600, 2600)
    } else {
        rng.range(1, 220)
    };
    let dqk = [1usize, 3, 8, 16, 20, 24, 33, 48, 64, 72][rng.range(0, 9)];
    let dv = if rng.chance(0.5) {
        dqk
    } else {
        [1usize, 5, 8, 16, 24, 40, 64][rng.range(0, 6)]
    };
    let mut c = Case::new(rng.range(1, 2), sq, skv, hkv * group, hkv, dqk, dv);
    c.seed = seed;
    c.causal = rng.chance(0.6);
    if rng.chance(0.6) {
        let side = |rng: &mut common::Rng| match rng.range(0, 5) {
            0 => 0usize,
            1 => usize::MAX,
            2 => rng.range(1, 8),
            _ => rng.range(1, 150),
        };
        let l = side(rng);
        let r = if rng.chance(0.5) { 0 } else { side(rng) };
        c.window = Some((l, r));
    }
    if rng.chance(0.2) {
        c.softcap = Some(5.0);
    }
    if rng.chance(0.2) {
        c.alibi = Some(0.3);
    }
    if rng.chance(0.15) {
        c.bias = Some(BiasSpec {
            neg_inf: 0.2,
            heads_1: rng.chance(0.5),
            ..BiasSpec::default()
        });
    }
    if rng.chance(0.2) {
        c.sinks = Some(Sinks::Mixed);
    }
    let (tq, tkv, to) = common::DTYPES[rng.range(0, 7)];
    if rng.chance(0.3) {
        c.tq = tq;
        c.tkv = tkv;
        c.to = to;
    }
    c.threads = [0usize, 1, 3][rng.range(0, 2)];
    c
}

#[test]
fn random_sweep() {
    let mut rng = common::Rng::new(0xbeef);
    let mut n = 0;
    for _ in 0..common::proptest_cases(256) {
        let c = random_case(&mut rng, n);
        check_sampled(&c);
        if n % 8 == 0 {
            bit_identity(&c);
        }
        n += 1;
    }
    eprintln!("random_sweep: {n} cases");
}

#[test]
fn random_nan_sweep() {
    let mut rng = common::Rng::new(0xfeed);
    let mut n = 0;
    for _ in 0..common::proptest_cases(256) {
        let mut c = random_case(&mut rng, 1000 + n);
        c.tq = DType::F32;
        c.tkv = DType::F32;
        c.to = DType::F32;
        c.bias = None; // the tolerance of a NaN bias is not the point here
        let b = rng.range(0, c.b - 1);
        let j = rng.range(0, c.skv - 1);
        let g = rng.range(0, c.hkv - 1);
        let e = rng.range(0, c.dqk - 1);
        let i = rng.range(0, c.sq - 1);
        let h = rng.range(0, c.hq - 1);
        let in_q = rng.chance(0.3);
        let cc = c.clone();
        check_nan_case(&c, &move |data: &mut common::Data| {
            if in_q {
                set_q(&cc, data, b, i, h, e, f32::NAN);
            } else {
                set_k(&cc, data, b, j, g, e, f32::NAN);
            }
        });
        n += 1;
    }
    eprintln!("random_nan_sweep: {n} cases");
}

/// Single-head items whose K/V panels do not fit the panel cache (K read in place by
/// blocks, the tail packed), under partial masks, with other layouts and V aliasing K.
#[test]
fn no_panel_cache_partial_masks() {
    use common::Layout;
    for (k, (causal, window)) in [
        (true, None),
        (true, Some((300usize, 0usize))),
        (false, Some((50, 20))),
        (true, Some((7, 0))),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Case::new(1, 40, 8300, 2, 1, 256, 256);
        c.causal = causal;
        c.window = window;
        c.seed = 9 + k as u64;
        if k % 2 == 1 {
            c.lq = Layout::Bhsd;
            c.lk = Layout::Bhsd;
            c.lv = Layout::Strided {
                order: 3,
                row_pad: 3,
                mid_pad: 1,
                outer_pad: 2,
            };
        }
        if k == 2 {
            c.v_alias_k = true;
            c.dv = 200;
        }
        check_sampled(&c);
    }
}

#[test]
fn zero_head_dims() {
    for &(dqk, dv) in &[(0usize, 8usize), (8, 0), (0, 0)] {
        for causal in [false, true] {
            let mut c = Case::new(1, 20, 70, 4, 2, dqk, dv);
            c.causal = causal;
            c.window = Some((5, 2));
            let data = c.data();
            for be in common::backends() {
                match run(&c, &data, be) {
                    Ok(_) => {
                        let want = data.reference(&c);
                        common::check_on(&c, &data, &want, be)
                            .unwrap_or_else(|e| panic!("{be} {dqk} {dv}: {e}"));
                    }
                    Err(e) => eprintln!("{be} dqk {dqk} dv {dv}: Err {e}"),
                }
            }
        }
    }
}
