//! Edge cases, each run on every available backend against the f64 reference (and, for
//! the exact properties, asserted exactly): fully masked rows, empty and single-element
//! dimensions, extreme logits and scales, odd head dims, MLA with V aliasing K, layouts,
//! sinks, softcap, ALiBi, GQA and MQA.

use crate::common;

use common::{BiasSpec, Case, DType, Layout, Sinks, check_all, run};

/// Runs `c` on every backend and returns how many of its rows see no key at all
/// (asserted to be exactly 0 with lse = -inf by `compare`).
fn check_masked_rows(c: &Case) -> usize {
    check_all(c).masked_rows
}

#[test]
fn fully_masked_rows_causal_with_short_kv() {
    // skv < sq: the first sq - skv queries sit at negative positions and see nothing.
    for &(sq, skv) in &[(10usize, 4usize), (70, 3), (5, 1), (130, 65)] {
        let mut c = Case::new(2, sq, skv, 4, 2, 32, 16);
        c.causal = true;
        assert_eq!(check_masked_rows(&c), 2 * 4 * (sq - skv), "{sq} {skv}");
        // Sinks and ALiBi must not resurrect an empty row.
        c.sinks = Some(Sinks::Mixed);
        c.alibi = Some(0.5);
        assert_eq!(check_masked_rows(&c), 2 * 4 * (sq - skv));
    }
}

#[test]
fn fully_masked_rows_sliding_window() {
    // window(0, 0) sees only the key at the query's own position; rows at negative
    // positions (sq > skv) see none, with or without causal.
    for causal in [false, true] {
        let mut c = Case::new(1, 12, 5, 2, 1, 16, 8);
        c.window = Some((0, 0));
        c.causal = causal;
        assert_eq!(check_masked_rows(&c), 2 * 7);
        // Every visible row sees exactly one key.
        let mut c = Case::new(2, 9, 9, 3, 3, 8, 8);
        c.window = Some((0, 0));
        c.causal = causal;
        assert_eq!(check_masked_rows(&c), 0);
    }
    // A left window that ends before key 0 for the early rows.
    let mut c = Case::new(1, 20, 3, 2, 2, 8, 4);
    c.window = Some((2, 0));
    assert_eq!(check_masked_rows(&c), 2 * 17);
    // Right-only window.
    let mut c = Case::new(1, 40, 100, 2, 1, 8, 4);
    c.window = Some((0, 5));
    c.causal = true;
    check_all(&c);
    // Unbounded sides.
    for w in [
        (usize::MAX, 0),
        (0, usize::MAX),
        (usize::MAX, usize::MAX),
        (7, usize::MAX),
    ] {
        let mut c = Case::new(1, 33, 77, 4, 2, 24, 24);
        c.window = Some(w);
        check_all(&c);
        c.causal = true;
        check_all(&c);
    }
}

#[test]
fn fully_masked_rows_bias_all_neg_inf() {
    for sinks in [None, Some(Sinks::Random(2.0)), Some(Sinks::All(1e30))] {
        let mut c = Case::new(2, 7, 70, 4, 2, 16, 16);
        c.bias = Some(BiasSpec {
            neg_inf: 1.0,
            ..BiasSpec::default()
        });
        c.sinks = sinks;
        assert_eq!(check_masked_rows(&c), 2 * 4 * 7);
    }
}

#[test]
fn sparse_neg_inf_bias_rows() {
    for (batch_1, heads_1) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut c = Case::new(2, 23, 150, 4, 2, 32, 20);
        c.bias = Some(BiasSpec {
            batch_1,
            heads_1,
            neg_inf: 0.6,
            neg_inf_rows: 0.3,
            amp: 3.0,
            row_pad: 3,
        });
        c.seed = 7;
        assert!(check_masked_rows(&c) > 0, "some rows are fully -inf");
        c.causal = true;
        c.softcap = Some(10.0);
        check_all(&c);
    }
}

#[test]
fn single_query() {
    for &skv in &[1usize, 5, 63, 64, 65, 255, 1000] {
        for causal in [false, true] {
            let mut c = Case::new(2, 1, skv, 8, 2, 64, 64);
            c.causal = causal;
            c.seed = skv as u64;
            check_all(&c);
        }
    }
}

/// Decode items that hold several kv heads and read f32 K/V in place, key-major over the
/// heads: plain, then with every modifier, a window, sinks and a partial last tile.
#[test]
fn multi_head_decode_in_place() {
    for &skv in &[1usize, 63, 65, 300] {
        let mut c = Case::new(2, 1, skv, 12, 4, 48, 32);
        c.seed = skv as u64;
        check_all(&c);
        c.softcap = Some(5.0);
        c.bias = Some(BiasSpec::default());
        c.alibi = Some(1.0);
        c.window = Some((40, 0));
        c.sinks = Some(Sinks::Random(2.0));
        c.causal = true;
        check_all(&c);
    }
}

#[test]
fn single_key() {
    for &sq in &[1usize, 2, 17, 64] {
        let mut c = Case::new(2, sq, 1, 4, 4, 16, 24);
        check_all(&c);
        c.causal = true; // only the last query sees the key
        assert_eq!(check_masked_rows(&c), 2 * 4 * (sq - 1));
    }
}

#[test]
fn no_keys_gives_zeros_and_neg_inf_lse() {
    for &sq in &[1usize, 3, 65] {
        let mut c = Case::new(2, sq, 0, 4, 2, 8, 8);
        assert_eq!(check_masked_rows(&c), 2 * 4 * sq);
        c.causal = true;
        c.sinks = Some(Sinks::Random(1.0));
        c.alibi = Some(1.0);
        c.bias = Some(BiasSpec::default());
        assert_eq!(check_masked_rows(&c), 2 * 4 * sq);
    }
}

#[test]
fn empty_batch_heads_or_queries_write_nothing() {
    for (b, sq, hq, hkv) in [
        (0, 5, 4, 2),
        (2, 0, 4, 2),
        (0, 0, 4, 2),
        (2, 5, 0, 2),
        (0, 0, 0, 1),
    ] {
        let mut c = Case::new(b, sq, 9, hq, hkv, 8, 8);
        c.lo = Layout::Strided {
            order: 0,
            row_pad: 2,
            mid_pad: 1,
            outer_pad: 1,
        };
        c.causal = true;
        let data = c.data();
        for be in common::backends() {
            // The output buffer is all sentinel: `padding_touched` counts any write.
            let got = run(&c, &data, be).unwrap_or_else(|e| panic!("{be}: {e}"));
            assert_eq!(got.padding_touched, 0, "{be}: {c:?}");
            assert!(got.out.is_empty() && got.lse.unwrap().is_empty());
        }
    }
}

/// Logits of magnitude 1e4 after scaling: the max must be subtracted before the scale
/// enters the exponent, or p loses ~1e-3 of relative accuracy.
#[test]
fn large_logits() {
    // d = 1: exact dot products q·k ∈ ±[1.15e4, 1.4e4] after scaling, so the error is the
    // softmax's own. Scale 0.5 takes the kernel's rounded-shift path (scale·log2 e ≤ 1:
    // the exponent is one FMA against fl(m·scale·log2 e)); one query over 4096 keys is
    // split across the KV range, so the merge must use the same shift.
    for (sign, scale, sq, skv) in [
        (1.0f32, 1.0f32, 16, 200),
        (-1.0, 1.0, 16, 200),
        (1.0, 0.5, 16, 200),
        (-1.0, 0.5, 16, 200),
        (1.0, 0.5, 1, 4096),
        (-1.0, 0.5, 1, 4096),
        (1.0, 1.0, 1, 4096),
    ] {
        for modified in [false, true] {
            let mut c = Case::new(1, sq, skv, 2, 1, 1, 8);
            c.scale = Some(scale);
            if modified {
                c.bias = Some(BiasSpec::default());
            }
            let mut data = c.data();
            for x in data.q.iter_mut() {
                // A power of 2, so that q·k is exact in f32.
                *x = sign * 128.0 / scale;
            }
            let mut r = common::Rng::new(3);
            for x in data.k.iter_mut() {
                *x = 100.0 + 10.0 * r.sym();
            }
            let want = data.reference(&c);
            for be in common::backends() {
                let e = common::check_on(&c, &data, &want, be)
                    .unwrap_or_else(|m| panic!("{be}: {m}\n{c:?}"));
                // Logits differ by O(1) around the max: relative accuracy must be f32-like.
                // (One query over 4096 keys: the scalar backend's f32 sums err by 1.4e-4
                // with this data, as before the rounded shift.)
                let bound = if sq == 1 { 3e-4 } else { 1e-4 };
                assert!(
                    e.out < bound && e.lse < 2e-3,
                    "{be}: errors {:e} (out), {:e} (lse) at logits ~{}e4, scale {scale}, \
                     sq {sq}",
                    e.out,
                    e.lse,
                    sign
                );
            }
        }
    }
    // Realistic: d = 64, |q|,|k| ≤ 40, scale 1 → logits up to ~1e4.
    for modified in [false, true] {
        let mut c = Case::new(2, 33, 130, 4, 2, 64, 64);
        c.scale = Some(1.0);
        c.amp = [40.0, 40.0, 1.0];
        c.causal = true;
        if modified {
            c.softcap = Some(2e4);
            c.alibi = Some(1.0);
        }
        check_all(&c);
    }
}

#[test]
fn extreme_scales() {
    for scale in [1e-30f32, 1e-45, 1e30] {
        for modified in [false, true] {
            let mut c = Case::new(2, 9, 50, 4, 2, 32, 16);
            c.scale = Some(scale);
            c.causal = true;
            if modified {
                c.alibi = Some(1e-3);
            }
            check_all(&c);
        }
    }
}

/// The largest finite scale is accepted by validation, so it must compute. With tiny Q
/// and K the scaled logits are O(100), so an error in the exponent shows in lse.
#[test]
fn largest_finite_scale() {
    for amp in [0.5f32, 1e-18] {
        for modified in [false, true] {
            let mut c = Case::new(1, 4, 20, 2, 1, 8, 8);
            c.scale = Some(f32::MAX);
            c.amp = [amp, amp, 1.0];
            if modified {
                c.alibi = Some(1e-3);
            }
            check_all(&c);
        }
    }
}

#[test]
fn head_dims() {
    let dims = [1usize, 3, 17, 65, 127, 129, 256];
    for (n, &dqk) in dims.iter().enumerate() {
        for &dv in &[dqk, dims[(n + 3) % dims.len()]] {
            let mut c = Case::new(1, 21, 67, 4, 2, dqk, dv);
            c.causal = n % 2 == 0;
            c.seed = (dqk * 1000 + dv) as u64;
            check_all(&c);
        }
    }
}

/// DeepSeek MLA: d_qk 576 / d_v 512 with V the first 512 columns of K's buffer (decode),
/// and d_qk 192 / d_v 128 (prefill).
#[test]
fn mla_v_aliases_k() {
    for &(sq, causal) in &[(1usize, false), (1, true), (4, true)] {
        let mut c = Case::new(1, sq, 200, 8, 1, 576, 512);
        c.v_alias_k = true;
        c.causal = causal;
        c.scale = Some(1.0 / (192f32).sqrt());
        check_all(&c);
        // The same with a padded K/V buffer (latent rows of a larger cache).
        c.lk = Layout::Strided {
            order: 0,
            row_pad: 64,
            mid_pad: 0,
            outer_pad: 3,
        };
        c.tkv = DType::Bf16;
        c.tq = DType::Bf16;
        check_all(&c);
    }
    let mut c = Case::new(1, 24, 40, 4, 4, 192, 128);
    c.causal = true;
    check_all(&c);
    c.v_alias_k = true;
    check_all(&c);
}

#[test]
fn bhsd_and_arbitrary_strides() {
    let strided = |order, row_pad, mid_pad, outer_pad| Layout::Strided {
        order,
        row_pad,
        mid_pad,
        outer_pad,
    };
    let layouts = [
        (Layout::Bhsd, Layout::Bhsd, Layout::Bhsd, Layout::Bhsd),
        (Layout::Bshd, Layout::Bhsd, Layout::Bshd, Layout::Bhsd),
        (
            strided(5, 3, 1, 7),
            strided(2, 1, 0, 0),
            strided(3, 0, 5, 2),
            strided(4, 2, 2, 2),
        ),
        (
            strided(1, 16, 0, 0),
            strided(0, 5, 5, 5),
            Layout::Bhsd,
            strided(5, 0, 0, 9),
        ),
    ];
    for (n, &(lq, lk, lv, lo)) in layouts.iter().enumerate() {
        let mut c = Case::new(3, 19, 71, 6, 2, 40, 24);
        (c.lq, c.lk, c.lv, c.lo) = (lq, lk, lv, lo);
        c.causal = n % 2 == 1;
        c.seed = n as u64;
        check_all(&c);
    }
    // Broadcast K/V over the batch (batch stride 0), a legal input view.
    let c = Case::new(2, 5, 30, 2, 1, 16, 16);
    let mut data = c.data();
    data.ks[0] = 0;
    data.vs[0] = 0;
    let want = data.reference(&c);
    for be in common::backends() {
        common::check_on(&c, &data, &want, be).unwrap_or_else(|m| panic!("{be}: {m}"));
    }
}

#[test]
fn sinks() {
    for sinks in [
        Sinks::Random(3.0),
        Sinks::All(f32::NEG_INFINITY),
        Sinks::All(30.0),
        Sinks::All(1e30), // swamps the denominator: the output is 0, lse unchanged
        Sinks::All(f32::MAX),
        Sinks::All(-1e30),
        Sinks::Mixed,
    ] {
        let mut c = Case::new(2, 17, 90, 4, 2, 32, 32);
        c.sinks = Some(sinks);
        c.causal = true;
        check_all(&c);
        c.softcap = Some(5.0);
        c.window = Some((20, 0));
        check_all(&c);
    }
    // lse excludes the sink: identical with and without it.
    let mut c = Case::new(1, 9, 40, 4, 1, 16, 16);
    let data = c.data();
    for be in common::backends() {
        c.sinks = None;
        let a = run(&c, &data, be).unwrap().lse.unwrap();
        c.sinks = Some(Sinks::Random(1.0));
        let data2 = c.data();
        let b = run(&c, &data2, be).unwrap().lse.unwrap();
        assert_eq!(a, b, "{be}: lse must not depend on the sinks");
    }
}

#[test]
fn softcap() {
    for cap in [0.5f32, 5.0, 50.0, 1e-3, 1e4] {
        let mut c = Case::new(2, 30, 70, 4, 2, 32, 32);
        c.softcap = Some(cap);
        c.scale = Some(1.0);
        c.amp = [3.0, 3.0, 1.0];
        c.seed = cap.to_bits() as u64;
        check_all(&c);
        c.causal = true;
        c.bias = Some(BiasSpec::default());
        check_all(&c);
    }
}

#[test]
fn alibi() {
    for &(sq, skv) in &[(1usize, 100usize), (30, 30), (50, 20), (20, 200)] {
        for causal in [false, true] {
            let mut c = Case::new(1, sq, skv, 8, 4, 32, 32);
            c.alibi = Some(1.0);
            c.causal = causal;
            check_all(&c);
            c.window = Some((10, 10));
            c.sinks = Some(Sinks::Random(2.0));
            check_all(&c);
        }
    }
}

#[test]
fn gqa_and_mqa() {
    for &(b, hq, hkv, sq) in &[
        (2usize, 64usize, 1usize, 1usize),
        (1, 64, 1, 7),
        (2, 8, 2, 33),
        (2, 6, 3, 20),
        (1, 12, 4, 50),
        (1, 128, 1, 2),
    ] {
        let mut c = Case::new(b, sq, 100, hq, hkv, 64, 64);
        c.causal = true;
        c.seed = (hq * 100 + hkv) as u64;
        check_all(&c);
    }
}

/// Shapes around the K/V tile (64 keys) and the Q tile sizes (64–256 rows of
/// query positions × heads of a GQA group, depending on the backend).
#[test]
fn tile_boundaries() {
    for &skv in &[63usize, 64, 65, 128, 129, 257] {
        for &(sq, hq) in &[
            (1usize, 48usize),
            (6, 8),
            (17, 15),
            (32, 3),
            (97, 1),
            (1, 256),
            (257, 1),
        ] {
            let mut c = Case::new(1, sq, skv, hq, 1, 16, 8);
            c.causal = true;
            c.seed = (skv * 1000 + sq) as u64;
            check_all(&c);
        }
    }
}

/// Split-KV (few groups, long KV range) where a group spans several Q tiles and the last
/// tile is partial: 400 rows per kv head (2–7 tiles per backend), rows that do not fill a
/// register block, a window that empties some splits, and sinks in the merge.
#[test]
fn split_kv_with_several_q_tiles() {
    for (sq, causal, window) in [
        (100usize, true, None),
        (100, false, Some((700usize, 0usize))),
        (3, true, Some((usize::MAX, 0))),
    ] {
        let mut c = Case::new(1, sq, 2300, 4, 1, 72, 40);
        c.causal = causal;
        c.window = window;
        c.sinks = Some(Sinks::Random(1.0));
        check_all(&c);
        c.lse = true;
        c.threads = 1;
        check_all(&c);
    }
}

/// Prefill tiles of several QK slabs (48 rows on AVX-512, 16 on AVX2) and Q tiles whose
/// rows run past slab, vector and tile edges, under partial masks: they must match the
/// reference, with the same bits for every thread count.
#[test]
fn prefill_slabs_under_partial_masks() {
    for &(sq, skv, hq, hkv, d, causal, window) in &[
        (200usize, 260usize, 6usize, 2usize, 64usize, true, None),
        (130, 130, 3, 1, 128, false, Some((40usize, 0usize))),
        (97, 300, 4, 4, 72, true, Some((150, 0))),
        (70, 70, 8, 2, 32, true, Some((5, 5))),
        (49, 100, 1, 1, 16, false, Some((10, 30))),
    ] {
        for tkv in [DType::F32, DType::Bf16] {
            let mut c = Case::new(1, sq, skv, hq, hkv, d, d);
            c.causal = causal;
            c.window = window;
            c.tkv = tkv;
            c.sinks = Some(Sinks::Mixed);
            check_all(&c);
            let data = c.data();
            for be in common::backends() {
                let one = run(&c, &data, be).unwrap();
                for t in [0usize, 2, 3] {
                    let mut ct = c.clone();
                    ct.threads = t;
                    let got = run(&ct, &data, be).unwrap();
                    assert_eq!(got.bits, one.bits, "{be} threads {t}: {c:?}");
                }
            }
        }
    }
}

/// Regression (independent review): ALiBi distances past position 2^24 must be exact
/// integers, not the difference of two positions rounded to f32.
#[test]
fn alibi_far_past_2_pow_24() {
    use flashcpu::{Attention, Tensor, TensorMut};
    let skv = (1usize << 24) + 101;
    let one = [0.5f32];
    let slopes = [1.0f32];
    // q·k = 0.25 for every key, distance d = 0..=8 in the window: lse = ln Σ e^(0.25 - d).
    let want: f64 = (0..=8).map(|d| (0.25 - d as f64).exp()).sum::<f64>().ln();
    for be in common::backends() {
        let (mut o, mut lse) = ([0.0f32], [0.0f32]);
        let kv = Tensor::from_strides(&one, [1, skv, 1, 1], [0, 0, 0, 1]).unwrap();
        Attention::new()
            .backend(be)
            .causal()
            .window(8, 0)
            .alibi(&slopes)
            .forward_with_lse(
                Tensor::bshd(&one, [1, 1, 1, 1]).unwrap(),
                kv,
                kv,
                &mut TensorMut::bshd(&mut o, [1, 1, 1, 1]).unwrap(),
                &mut lse,
            )
            .unwrap();
        assert!(
            (lse[0] as f64 - want).abs() < 1e-5,
            "{be}: lse {} want {want}",
            lse[0]
        );
        assert!((o[0] - 0.5).abs() < 1e-6, "{be}: o {}", o[0]);
    }
}

/// Regression (independent review): a NaN in Q, or in a key of K that a row sees, makes
/// that row's output and LSE NaN on every backend, thread count and path (prefill,
/// multi-head split decode, with and without modifiers), as in the reference; rows that
/// do not see it are unaffected.
#[test]
fn nan_in_q_or_visible_k_gives_nan_rows() {
    use flashcpu::{Attention, Tensor, TensorMut, reference};
    // (sq, skv, hq, hkv, d, causal), then the NaN: in Q at (i, h), or in K at (j, g).
    type Shape = (usize, usize, usize, usize, usize, bool);
    let cases: &[(Shape, bool, (usize, usize))] = &[
        ((5, 70, 4, 2, 16, true), true, (2, 1)),
        ((5, 70, 4, 2, 16, true), false, (10, 0)),
        ((70, 70, 4, 2, 16, true), false, (40, 0)),
        ((200, 200, 2, 1, 64, true), false, (100, 0)),
        ((1, 3000, 8, 2, 32, false), false, (1500, 1)),
        ((1, 3000, 8, 2, 32, false), true, (0, 5)),
    ];
    for &((sq, skv, hq, hkv, d, causal), in_q, (x, y)) in cases {
        for modified in [false, true] {
            let mut q: Vec<f32> = (0..sq * hq * d)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.05)
                .collect();
            let mut k: Vec<f32> = (0..skv * hkv * d)
                .map(|i| ((i % 7) as f32 - 3.0) * 0.07)
                .collect();
            let v: Vec<f32> = (0..skv * hkv * d)
                .map(|i| ((i % 11) as f32 - 5.0) * 0.1)
                .collect();
            if in_q {
                q[(x * hq + y) * d + 3] = f32::NAN;
            } else {
                k[(x * hkv + y) * d + 3] = f32::NAN;
            }
            let slopes = vec![0.25f32; hq];
            let mut attn = Attention::new();
            if causal {
                attn = attn.causal();
            }
            if modified {
                attn = attn.softcap(20.0).alibi(&slopes);
            }
            let qt = Tensor::bshd(&q, [1, sq, hq, d]).unwrap();
            let kt = Tensor::bshd(&k, [1, skv, hkv, d]).unwrap();
            let vt = Tensor::bshd(&v, [1, skv, hkv, d]).unwrap();
            let want = reference::attention(&attn, qt, kt, vt).unwrap();
            let mut nan_rows = 0;
            for be in common::backends() {
                for threads in [1usize, 0] {
                    let mut o = vec![0.0f32; sq * hq * d];
                    let mut lse = vec![0.0f32; hq * sq];
                    attn.backend(be)
                        .threads(threads)
                        .forward_with_lse(
                            qt,
                            kt,
                            vt,
                            &mut TensorMut::bshd(&mut o, [1, sq, hq, d]).unwrap(),
                            &mut lse,
                        )
                        .unwrap();
                    nan_rows = 0;
                    for i in 0..sq {
                        for h in 0..hq {
                            let w_nan = want.lse_at(0, h, i).is_nan();
                            nan_rows += w_nan as usize;
                            let row = &o[(i * hq + h) * d..][..d];
                            let ctx = format!(
                                "{be} t{threads} mod {modified} case {sq} {skv} {in_q} row ({i},{h})"
                            );
                            assert_eq!(lse[h * sq + i].is_nan(), w_nan, "lse {ctx}");
                            if w_nan {
                                assert!(row.iter().all(|x| x.is_nan()), "out {ctx}");
                            } else {
                                for (c, &x) in row.iter().enumerate() {
                                    let r = want.out_at(0, i, h, c);
                                    assert!(
                                        (x as f64 - r).abs() < 1e-4,
                                        "out {ctx} c{c}: {x} vs {r}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            assert!(nan_rows > 0, "the NaN must reach some row");
        }
    }
}

/// Regression (independent review): dot products past f32's range (finite inputs of
/// ~1e20) cannot give a meaningful f32 result; the row is NaN (loud), not a uniform
/// average with lse = +inf (silently wrong). The softcap path stays finite and correct.
#[test]
fn dot_products_past_f32_make_the_row_nan() {
    use flashcpu::{Attention, Tensor, TensorMut};
    let (skv, d) = (6usize, 1usize);
    let q = [1e20f32];
    let k: Vec<f32> = (0..skv).map(|j| 1e20 * (1.0 + j as f32 / 10.0)).collect();
    let v: Vec<f32> = (0..skv).map(|j| j as f32).collect();
    for be in common::backends() {
        for cap in [None, Some(10.0f32)] {
            let (mut o, mut lse) = ([0.0f32], [0.0f32]);
            let mut a = Attention::new().backend(be).scale(1.0);
            if let Some(c) = cap {
                a = a.softcap(c);
            }
            a.forward_with_lse(
                Tensor::bshd(&q, [1, 1, 1, d]).unwrap(),
                Tensor::bshd(&k, [1, skv, 1, d]).unwrap(),
                Tensor::bshd(&v, [1, skv, 1, d]).unwrap(),
                &mut TensorMut::bshd(&mut o, [1, 1, 1, d]).unwrap(),
                &mut lse,
            )
            .unwrap();
            match cap {
                None => assert!(o[0].is_nan() && lse[0].is_nan(), "{be}: {o:?} {lse:?}"),
                // Every key's capped logit is 10 (tanh saturates): the mean of v.
                Some(_) => assert!((o[0] - 2.5).abs() < 1e-5, "{be}: {o:?}"),
            }
        }
    }
}
