//! Vectorised `exp2` and `tanh`, generic over `S: pulp::Simd`.
//!
//! pulp has no transcendental functions; both are built from FMAs, compares and an
//! integer shift into the exponent field, so they inline into the kernels on every
//! backend (an out-of-line call here made AVX2 44× slower in the tooling spike).

use pulp::Simd;

/// 2^f on f ∈ [-0.5, 0.5]: degree-6 polynomial fitted for minimal relative error
/// (Lawson-weighted least squares on Chebyshev nodes); 2.0e-9 in exact arithmetic,
/// ≤ 1.0e-7 when evaluated in f32 with Horner's rule.
#[allow(clippy::approx_constant)] // fitted coefficients; c0 is near ln 2 but not it
const EXP2_POLY: [f32; 6] = [
    0.693_147_2,
    0.240_226_48,
    0.055_503_324,
    0.009_618_437,
    0.001_339_887_5,
    0.000_153_533_62,
];

/// Below this, `exp2` returns exactly 0 (2^-125 ≈ 2.4e-38: far below anything a softmax
/// sum can resolve, and it keeps the result out of the denormal range, where the
/// exponent-field trick is invalid).
pub(crate) const EXP2_MIN: f32 = -125.0;

/// Relative error bound of [`exp2`] for `x >= EXP2_MIN` (measured ≤ 1.3e-7 over a dense
/// sweep; see the test below), and for `x < EXP2_MIN` the result is exactly 0.
#[allow(dead_code)] // read by the tests
pub(crate) const EXP2_REL_ERR: f64 = 2.0e-7;

/// `2^x` lane-wise for `x <= 127` (the softmax passes `x <= 0` except in rows that already
/// hold a NaN, tanh `x <= 26`), within [`EXP2_REL_ERR`] and exact at integers. `-inf` and
/// every `x < -125` give exactly `+0`. AVX-512 reduces and evaluates differently from
/// the portable path (so their bits may differ in the last place); past 128 it gives
/// +inf where the portable path clamps at 2^127. NaN lanes give NaN on AVX-512 and an
/// unspecified value elsewhere (the softmax checks its scores for NaN itself).
#[inline(always)]
pub(crate) fn exp2<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    // AVX-512 has the reduction and the exponent scaling as one instruction each: 9 µops
    // instead of 15 (the softmax's exp is ~10 % of d 64 prefill).
    #[cfg(target_arch = "x86_64")]
    if let Some(&v4) = (&simd as &dyn core::any::Any).downcast_ref::<pulp::x86::V4>() {
        return bytemuck::cast(exp2_v4(v4, bytemuck::cast(x)));
    }
    exp2_generic(simd, x)
}

/// Whether [`exp2`] gives NaN for NaN lanes on this backend (AVX-512 only).
#[inline(always)]
pub(crate) fn exp2_keeps_nan<S: Simd>() -> bool {
    #[cfg(target_arch = "x86_64")]
    let v4 = core::any::TypeId::of::<pulp::x86::V4>();
    #[cfg(not(target_arch = "x86_64"))]
    let v4 = core::any::TypeId::of::<()>();
    core::any::TypeId::of::<S>() == v4
}

/// Whether `mul_add_e_f32s` is one fused multiply-add (one rounding) on this backend:
/// AVX2+FMA, AVX-512 and NEON; pulp's scalar backend rounds the product first.
#[inline(always)]
pub(crate) fn fused_mul_add<S: Simd>() -> bool {
    use core::any::TypeId;
    let s = TypeId::of::<S>();
    #[cfg(target_arch = "x86_64")]
    return s == TypeId::of::<pulp::x86::V4>() || s == TypeId::of::<pulp::x86::V3>();
    #[cfg(target_arch = "aarch64")]
    return s == TypeId::of::<pulp::aarch64::Neon>();
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return {
        let _ = s;
        false
    };
}

/// [`exp2`] from portable operations: the exponent is added to the polynomial's bits.
#[inline(always)]
fn exp2_generic<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    // Round to nearest with the 1.5·2^23 trick: adding it leaves round(x) in the low
    // mantissa bits, and subtracting it back gives round(x) as a float.
    let magic = simd.splat_f32s(12_582_912.0);
    let xc = simd.min_f32s(
        simd.max_f32s(x, simd.splat_f32s(EXP2_MIN - 1.0)),
        simd.splat_f32s(127.0),
    );
    let t = simd.add_f32s(xc, magic);
    let n = simd.sub_f32s(t, magic);
    let f = simd.sub_f32s(xc, n); // exact, in [-0.5, 0.5]
    let p = exp2_poly(simd, f);
    // The low bits of `t` hold round(x) (two's complement, offset by the magic number's
    // own mantissa, whose low 9 bits are 0), so `t << 23` is round(x) in the exponent
    // field: adding it to p's bits multiplies p by 2^round(x).
    let tb = simd.transmute_u32s_f32s(t);
    let scale = simd.wrapping_dyn_shl_u32s(tb, simd.splat_u32s(23));
    let r = simd.transmute_f32s_u32s(simd.add_u32s(simd.transmute_u32s_f32s(p), scale));
    let tiny = simd.less_than_f32s(x, simd.splat_f32s(EXP2_MIN));
    simd.select_f32s(tiny, simd.splat_f32s(0.0), r)
}

/// `Σ c[k]·x^k` by Horner's rule (`c` from the constant term up).
#[inline(always)]
fn horner<S: Simd>(simd: S, x: S::f32s, c: &[f32]) -> S::f32s {
    let (&top, rest) = c.split_last().expect("a polynomial has a coefficient");
    rest.iter().rev().fold(simd.splat_f32s(top), |p, &ck| {
        simd.mul_add_e_f32s(p, x, simd.splat_f32s(ck))
    })
}

/// 2^f for f ∈ [-0.5, 0.5]: 1 + f·P(f) with [`EXP2_POLY`].
#[inline(always)]
fn exp2_poly<S: Simd>(simd: S, f: S::f32s) -> S::f32s {
    let p = horner(simd, f, &EXP2_POLY);
    simd.mul_add_e_f32s(p, f, simd.splat_f32s(1.0))
}

/// 2^f on f ∈ [0, 1): 1 + f·P(f), P of degree 5 fitted like [`EXP2_POLY`] (2.0e-9
/// relative in exact arithmetic): the AVX-512 path's polynomial, whose reduction floors.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::approx_constant)] // fitted coefficients; c0 is near ln 2 but not it
const EXP2_POLY_FLOOR: [f32; 6] = [
    0.693_147_04,
    0.240_229_31,
    0.055_485_28,
    0.009_675_452,
    0.001_246_784_5,
    0.000_216_129_19,
];

/// [`exp2`] on AVX-512 in 9 µops: `vreduceps` gives f = x - floor(x) ∈ [0, 1) in one
/// instruction, the polynomial gives 2^f, and `vscalefps` multiplies by 2^floor(x)
/// itself (it floors its exponent operand), zeroed where `x < EXP2_MIN` (so -inf, whose
/// `f` is NaN, gives 0; the result stays normal). NaN lanes stay NaN (the compare is
/// unordered-true). Against the generic path's 11 µops (rounding by the 1.5·2^23 trick
/// takes two, the reduction a third), d 64 prefill spends ~1/8 of its time in exp.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn exp2_v4(simd: pulp::x86::V4, x: pulp::f32x16) -> pulp::f32x16 {
    use core::arch::x86_64::{__m512, _CMP_NLT_UQ, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEG_INF};
    let xv: __m512 = bytemuck::cast(x);
    // imm8: keep 0 fraction bits (7:4), suppress precision exceptions, round down.
    let f = simd
        .avx512dq
        ._mm512_reduce_ps::<{ _MM_FROUND_NO_EXC | _MM_FROUND_TO_NEG_INF }>(xv);
    let p = horner(simd, bytemuck::cast(f), &EXP2_POLY_FLOOR);
    let p = simd.mul_add_e_f32s(p, bytemuck::cast(f), simd.splat_f32s(1.0));
    let m: __m512 = bytemuck::cast(simd.splat_f32s(EXP2_MIN));
    let keep = simd.avx512f._mm512_cmp_ps_mask::<_CMP_NLT_UQ>(xv, m);
    let r = simd
        .avx512f
        ._mm512_maskz_scalef_ps(keep, bytemuck::cast(p), xv);
    bytemuck::cast(r)
}

/// tanh(y) for |y| < 0.625 as y + y³·P(y²), degree 5 in y², relative error ≤ 8e-8 in f32.
const TANH_POLY: [f32; 5] = [
    -0.333_332_8,
    0.133_314_42,
    -0.053_739_715,
    0.020_639_086,
    -0.005_704_985,
];

/// `tanh(y)` lane-wise, relative error ≤ 3e-7: a polynomial near 0 (where the
/// exponential form would cancel) and `1 - 2/(e^{2|y|} + 1)` elsewhere.
#[inline(always)]
pub(crate) fn tanh<S: Simd>(simd: S, y: S::f32s) -> S::f32s {
    let sign = simd.and_f32s(y, simd.splat_f32s(-0.0));
    let a = simd.min_f32s(simd.abs_f32s(y), simd.splat_f32s(9.0));
    // Large branch: e = 2^(2a·log2 e) ∈ [1, 2^26].
    let e = exp2(
        simd,
        simd.mul_f32s(a, simd.splat_f32s(2.0 * core::f32::consts::LOG2_E)),
    );
    let big = simd.sub_f32s(
        simd.splat_f32s(1.0),
        simd.div_f32s(simd.splat_f32s(2.0), simd.add_f32s(e, simd.splat_f32s(1.0))),
    );
    // Small branch.
    let z = simd.mul_f32s(a, a);
    let p = horner(simd, z, &TANH_POLY);
    let small = simd.mul_add_e_f32s(simd.mul_f32s(p, z), a, a);
    let is_small = simd.less_than_f32s(a, simd.splat_f32s(0.625));
    let r = simd.select_f32s(is_small, small, big);
    simd.or_f32s(r, sign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, dispatch};
    use pulp::WithSimd;

    struct Apply<'a> {
        f: fn(f64) -> f64,
        which: u8,
        xs: &'a [f32],
    }
    impl WithSimd for Apply<'_> {
        type Output = f64; // worst relative error
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) -> f64 {
            let mut worst = 0.0f64;
            for chunk in self.xs.chunks(S::F32_LANES) {
                let x = simd.partial_load_f32s(chunk);
                let y = if self.which == 0 {
                    exp2(simd, x)
                } else {
                    tanh(simd, x)
                };
                let mut out = vec![0.0f32; chunk.len()];
                simd.partial_store_f32s(&mut out, y);
                for (&xi, &yi) in chunk.iter().zip(&out) {
                    let want = (self.f)(xi as f64);
                    let err = if want == 0.0 {
                        yi.abs() as f64
                    } else {
                        ((yi as f64 - want) / want).abs()
                    };
                    worst = worst.max(err);
                }
            }
            worst
        }
    }

    fn sweep(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * (i as f32 / n as f32))
            .collect()
    }

    #[test]
    fn exp2_error_bound_every_backend() {
        let xs = sweep(EXP2_MIN, 0.0, 400_000);
        for b in Backend::available() {
            let worst = dispatch(
                b,
                Apply {
                    f: f64::exp2,
                    which: 0,
                    xs: &xs,
                },
            )
            .unwrap();
            assert!(worst <= EXP2_REL_ERR, "{b}: exp2 relative error {worst:e}");
        }
    }

    /// The AVX-512 path (`vreduceps`, `vscalefps`) on its whole domain: within the
    /// bound, exact at integers, 0 below `EXP2_MIN`, +inf from 128 on, NaN kept.
    #[test]
    fn exp2_avx512_whole_domain() {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V4::try_new() {
            let mut xs = sweep(-140.0, 127.99, 600_000);
            xs.extend((-125..=127).map(|k| k as f32));
            xs.extend([
                f32::NEG_INFINITY,
                -1e30,
                -125.0,
                -0.0,
                0.5,
                -0.5,
                126.5,
                128.0,
            ]);
            xs.extend([f32::INFINITY, 1e30, f32::NAN, -125.000_01, 0.999_999_9]);
            // Just below an integer x − floor(x) rounds up to 1: the polynomial's value
            // at 1 carries the result.
            xs.extend([
                -1e-9,
                -1e-30,
                -f32::MIN_POSITIVE,
                2.0 - 1e-7,
                -3.000_000_2,
                -124.999_99,
            ]);
            for chunk in xs.chunks(16) {
                let x = simd.partial_load_f32s(chunk);
                let mut y = [0.0f32; 16];
                simd.partial_store_f32s(&mut y, exp2(simd, x));
                for (&xi, &yi) in chunk.iter().zip(&y) {
                    let want = (xi as f64).exp2();
                    let ok = if xi.is_nan() {
                        yi.is_nan()
                    } else if xi < EXP2_MIN {
                        yi.to_bits() == 0
                    } else if xi >= 128.0 {
                        yi == f32::INFINITY
                    } else if xi == xi.floor() {
                        yi as f64 == want
                    } else {
                        ((yi as f64 - want) / want).abs() <= EXP2_REL_ERR
                    };
                    assert!(ok, "exp2({xi}) = {yi}, want {want}");
                }
            }
        }
    }

    #[test]
    fn exp2_special_values() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -126.0,
            -125.5,
            -0.0,
            0.0,
            1.0,
            10.0,
        ];
        let want = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 1024.0];
        for b in Backend::available() {
            struct Run<'a>(&'a [f32]);
            impl WithSimd for Run<'_> {
                type Output = Vec<f32>;
                #[inline(always)]
                fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
                    self.0
                        .iter()
                        .map(|&x| {
                            let mut o = [0.0f32];
                            simd.partial_store_f32s(&mut o, exp2(simd, simd.splat_f32s(x)));
                            o[0]
                        })
                        .collect()
                }
            }
            let got = dispatch(b, Run(&xs)).unwrap();
            for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
                assert_eq!(
                    g.to_bits(),
                    (*w as f32).to_bits(),
                    "{b}: exp2({x}) = {g}, want {w}"
                );
            }
        }
    }

    #[test]
    fn tanh_error_bound_every_backend() {
        let mut xs = sweep(-12.0, 12.0, 400_000);
        xs.extend(sweep(-1e-3, 1e-3, 10_000));
        for b in Backend::available() {
            let worst = dispatch(
                b,
                Apply {
                    f: f64::tanh,
                    which: 1,
                    xs: &xs,
                },
            )
            .unwrap();
            assert!(worst <= 3e-7, "{b}: tanh relative error {worst:e}");
        }
    }
}
