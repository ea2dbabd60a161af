//! Mixed storage types: Q, K/V and O types are independent. Each combination is compared
//! with the reference computed on the same (already rounded) inputs, with the output
//! type's rounding added to the tolerance.

use crate::common;

use common::{BiasSpec, Case, DType, check_on, compare, run_typed, tolerance};
use flashcpu::{Element, bf16, f16};

fn case(tq: DType, tkv: DType, to: DType, seed: u64) -> Case {
    let mut c = Case::new(2, 37, 90, 6, 2, 72, 40);
    (c.tq, c.tkv, c.to) = (tq, tkv, to);
    c.causal = true;
    c.softcap = Some(15.0);
    c.bias = Some(BiasSpec {
        batch_1: true,
        neg_inf: 0.05,
        ..BiasSpec::default()
    });
    c.amp = [2.0, 2.0, 3.0];
    c.seed = seed;
    c
}

fn check<Q: Element, KV: Element, O: Element>(seed: u64) {
    let dt = |name: &str| match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        _ => DType::Bf16,
    };
    let c = case(dt(Q::NAME), dt(KV::NAME), dt(O::NAME), seed);
    let data = c.data();
    let want = data.reference(&c);
    let tol = tolerance(&c, &data);
    for be in common::backends() {
        let got = run_typed::<Q, KV, O>(&c, &data, be).unwrap_or_else(|e| panic!("{be}: {e}"));
        if let Err(m) = compare(&c, &got, &want, tol) {
            panic!("{be}, q {} kv {} o {}: {m}", Q::NAME, KV::NAME, O::NAME);
        }
    }
}

#[test]
fn f16_inputs_f32_output() {
    check::<f16, f16, f32>(1);
}

#[test]
fn bf16_inputs_f32_output() {
    check::<bf16, bf16, f32>(2);
}

#[test]
fn f32_q_half_kv() {
    check::<f32, f16, f32>(3);
    check::<f32, bf16, f32>(4);
}

#[test]
fn half_q_other_half_kv() {
    check::<f16, bf16, f16>(5);
    check::<bf16, f16, bf16>(6);
}

#[test]
fn half_outputs() {
    check::<f32, f32, f16>(7);
    check::<f32, f32, bf16>(8);
    check::<f16, f16, f16>(9);
    check::<bf16, bf16, bf16>(10);
    check::<bf16, f32, f16>(11);
}

/// The output type only changes the final store: the f16 and bf16 outputs are exactly
/// the f32 output rounded to nearest even, and lse does not depend on the output type.
#[test]
fn output_type_only_changes_the_final_rounding() {
    let c = case(DType::F16, DType::F16, DType::F32, 12);
    let data = c.data();
    let want = data.reference(&c);
    for be in common::backends() {
        let wide = run_typed::<f16, f16, f32>(&c, &data, be).unwrap();
        let narrow = run_typed::<f16, f16, f16>(&c, &data, be).unwrap();
        let nb = run_typed::<f16, f16, bf16>(&c, &data, be).unwrap();
        // The narrow outputs are the f32 output rounded once (round to nearest even).
        for ((w, n), b) in wide.out.iter().zip(&narrow.out).zip(&nb.out) {
            assert_eq!(
                f16::from_f32(*w as f32).to_f32() as f64,
                *n,
                "{be}: f16 store of {w}"
            );
            assert_eq!(
                bf16::from_f32(*w as f32).to_f32() as f64,
                *b,
                "{be}: bf16 store of {w}"
            );
        }
        assert_eq!(
            wide.lse, narrow.lse,
            "{be}: lse does not depend on the output type"
        );
        check_on(&c, &data, &want, be).unwrap();
    }
}

/// Row conversions to f32 are exact for every f16 and bf16 bit pattern (NaNs stay NaN),
/// over row lengths that do and do not fill the vectorised loop's 8-value steps.
#[test]
fn row_conversions_are_exact_for_every_value() {
    fn check_all<T: Element>(from_bits: fn(u16) -> T, to_f32: fn(T) -> f32) {
        let all: Vec<T> = (0..=u16::MAX).map(from_bits).collect();
        for len in [1usize, 7, 8, 9, 72, 133] {
            for (ci, chunk) in all.chunks(len).enumerate() {
                let mut dst = vec![0.0f32; chunk.len()];
                T::load_row(chunk, &mut dst);
                for (x, (&s, &d)) in chunk.iter().zip(&dst).enumerate() {
                    let want = to_f32(s);
                    assert!(
                        want.to_bits() == d.to_bits() || (want.is_nan() && d.is_nan()),
                        "{} bits {:#06x}: {d} for {want}",
                        T::NAME,
                        ci * len + x
                    );
                }
            }
        }
    }
    check_all::<f16>(f16::from_bits, f16::to_f32);
    check_all::<bf16>(bf16::from_bits, bf16::to_f32);
}

/// Strided tiles of rows (`load_rows`, as K/V tiles are converted) give the row-by-row
/// values, and leave the gaps between rows untouched.
#[test]
fn strided_row_conversions_match_rows() {
    fn check<T: Element>(from_bits: fn(u16) -> T) {
        let src: Vec<T> = (0..4096u16)
            .map(|i| from_bits(i.wrapping_mul(40503)))
            .collect();
        for (len, ss, ds, n) in [
            (8usize, 8usize, 8usize, 5usize),
            (13, 20, 16, 7),
            (72, 72, 80, 3),
            (5, 0, 9, 4),
        ] {
            let mut dst = vec![-7.5f32; (n - 1) * ds + len + 3];
            T::load_rows(&src, ss, &mut dst, ds, n, len);
            for (i, &got) in dst.iter().enumerate() {
                let (r, c) = (i / ds, i % ds);
                if r < n && c < len {
                    let mut one = vec![0.0f32; len];
                    T::load_row(&src[r * ss..][..len], &mut one);
                    let want = one[c];
                    assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
                } else {
                    assert_eq!(got, -7.5, "{}: gap value {i} written", T::NAME);
                }
            }
        }
    }
    check::<f16>(f16::from_bits);
    check::<bf16>(bf16::from_bits);
    check::<f32>(|b| f32::from(b) - 2000.0);
}

/// Decode over f16 and bf16 K/V caches, which AVX-512 (and AVX2 with F16C) reads in
/// place and converts as the score and PV blocks load it (head dims of whole vectors;
/// other dims convert into scratch): GQA groups that fill part of a 4-row block, exactly one, or OR-row blocks
/// (8 and 12 rows), one and two queries, head dims from one vector to eight and
/// `dv ≠ dqk`, odd strides (unaligned rows) and V inside K's buffer, tail tiles and
/// split-KV, with every modifier; and bit identity across thread counts.
#[test]
fn half_kv_decode_in_place() {
    use common::{Layout, Sinks, check_sampled, run, sampled};
    let odd = Layout::Strided {
        order: 1,
        row_pad: 3,
        mid_pad: 1,
        outer_pad: 5,
    };
    let mut n = 0u64;
    for tkv in [DType::F16, DType::Bf16] {
        for &(hq, hkv) in &[(4usize, 4usize), (6, 3), (12, 4), (20, 4), (16, 2), (24, 3)] {
            for &(dqk, dv) in &[(16usize, 16usize), (64, 32), (128, 128), (48, 80), (72, 72)] {
                for &skv in &[1usize, 9, 70, 1100] {
                    n += 1;
                    let mut c = Case::new(
                        1 + (n % 2) as usize,
                        1 + n.is_multiple_of(3) as usize,
                        skv,
                        hq,
                        hkv,
                        dqk,
                        dv,
                    );
                    (c.tkv, c.seed) = (tkv, n);
                    c.amp = [1.5, 3.0, 2.0];
                    match n % 4 {
                        0 => (c.lk, c.lv) = (Layout::Bhsd, odd),
                        1 => (c.lk, c.lv) = (odd, Layout::Bshd),
                        2 => c.v_alias_k = dv <= dqk,
                        _ => {}
                    }
                    if n.is_multiple_of(5) {
                        c.causal = true;
                        c.window = Some((40, 0));
                        c.softcap = Some(8.0);
                        c.alibi = Some(1.0);
                        c.sinks = Some(Sinks::Random(2.0));
                        c.bias = Some(BiasSpec::default());
                    }
                    check_sampled(&c);
                    if skv > 1000 && sampled(&c) {
                        let data = c.data();
                        for be in common::backends() {
                            c.threads = 1;
                            let one = run(&c, &data, be).unwrap().bits;
                            c.threads = 0;
                            assert_eq!(run(&c, &data, be).unwrap().bits, one, "{be}: {c:?}");
                        }
                    }
                }
            }
        }
    }
}

/// The storage type only changes the loads: decode over f16 or bf16 K/V (read in place
/// and converted as loaded on AVX-512, and on AVX2 with F16C) gives the bits that decode
/// over f32 K/V holding the same values gives, on one thread and on several. Layouts:
/// BSHD with V inside K's rows, odd strides (unaligned rows), a zero key stride.
#[test]
fn half_kv_decode_is_bit_identical_to_f32() {
    use flashcpu::{Attention, Backend, Tensor, TensorMut};
    fn go<T: Element>(be: Backend, seed: &mut common::Rng, n: &mut usize) {
        for &(hq, hkv) in &[(8usize, 2usize), (24, 3), (40, 4)] {
            for &(dqk, dv) in &[(16usize, 16usize), (128, 128), (64, 48)] {
                for &skv in &[9usize, 300] {
                    for layout in 0..3 {
                        // Under emulation (few proptest cases) a quarter of the cases.
                        *n += 1;
                        if common::proptest_cases(256) < 64 && !n.is_multiple_of(4) {
                            continue;
                        }
                        let (b, sq, d) = (2, 1 + skv % 2, dqk.max(dv));
                        // (strides, buffer length, offset of V in the buffer)
                        let (st, len, voff) = match layout {
                            0 => {
                                let row = dqk + dv + 3;
                                let s = [skv * hkv * row, hkv * row, row, 1];
                                (s, b * s[0], dqk + 1)
                            }
                            1 => {
                                let s1 = hkv * (d + 3) + 1;
                                let s = [skv * s1 + 5, s1, d + 3, 1];
                                (s, 2 * b * s[0] + 7, b * s[0] + 3)
                            }
                            _ => {
                                let s = [hkv * d, 0, d, 1];
                                (s, 2 * b * s[0], b * s[0])
                            }
                        };
                        let half: Vec<T> =
                            (0..len).map(|_| T::from_f32(2.0 * seed.sym())).collect();
                        let wide: Vec<f32> = half.iter().map(|x| x.to_f32()).collect();
                        let q: Vec<f32> = (0..b * sq * hq * dqk).map(|_| seed.sym()).collect();
                        let qt = Tensor::bshd(&q, [b, sq, hq, dqk]).unwrap();
                        let (ks, vs) = ([b, skv, hkv, dqk], [b, skv, hkv, dv]);
                        let out = |threads: usize, f32_kv: bool| -> Vec<u32> {
                            let mut o = vec![0f32; b * sq * hq * dv];
                            let ot = &mut TensorMut::bshd(&mut o, [b, sq, hq, dv]).unwrap();
                            let a = Attention::new().backend(be).threads(threads).causal();
                            if f32_kv {
                                let k = Tensor::from_strides(&wide, ks, st).unwrap();
                                let v = Tensor::from_strides(&wide[voff..], vs, st).unwrap();
                                a.forward(qt, k, v, ot).unwrap();
                            } else {
                                let k = Tensor::from_strides(&half, ks, st).unwrap();
                                let v = Tensor::from_strides(&half[voff..], vs, st).unwrap();
                                a.forward(qt, k, v, ot).unwrap();
                            }
                            o.iter().map(|x| x.to_bits()).collect()
                        };
                        let one = out(1, false);
                        let what = format!(
                            "{be} {} hq {hq} hkv {hkv} d {dqk}/{dv} skv {skv} L{layout}",
                            T::NAME
                        );
                        assert_eq!(one, out(1, true), "{what}: half against f32");
                        assert_eq!(one, out(0, false), "{what}: threads");
                    }
                }
            }
        }
    }
    let (mut seed, mut n) = (common::Rng::new(77), 0);
    for be in common::backends() {
        if matches!(be, Backend::Avx2 | Backend::Avx512) {
            go::<f16>(be, &mut seed, &mut n);
            go::<bf16>(be, &mut seed, &mut n);
        }
    }
}
