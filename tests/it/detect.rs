//! Backend detection and forcing.
//!
//! `FLASHCPU_EXPECT_DETECT=avx2` (or `scalar`, `avx512`, `neon`) makes
//! `detect_matches_expectation` require that `Backend::detect()` picks exactly that
//! backend: CI sets it natively from /proc/cpuinfo, to `avx2` under
//! `qemu-x86_64 -cpu max`, to `scalar` under `qemu-x86_64 -cpu Nehalem` and to `neon`
//! under qemu-aarch64. Unset, the test only prints what was detected.

use flashcpu::{Attention, Backend, Error, Tensor, TensorMut, reference};

/// The fastest-first preference detection must follow.
fn preferred(available: &[Backend]) -> Backend {
    [Backend::Avx512, Backend::Avx2, Backend::Neon]
        .into_iter()
        .find(|b| available.contains(b))
        .unwrap_or(Backend::Scalar)
}

#[test]
fn detect_matches_expectation() {
    let detected = Backend::detect();
    match std::env::var("FLASHCPU_EXPECT_DETECT") {
        Ok(want) if !want.trim().is_empty() => {
            let want_backend: Backend = want.parse().unwrap_or_else(|e| {
                panic!("FLASHCPU_EXPECT_DETECT={want:?} is not a backend name: {e}")
            });
            assert_eq!(
                detected.name(),
                want_backend.name(),
                "FLASHCPU_EXPECT_DETECT={want} but Backend::detect() picked {detected} \
                 (available: {:?})",
                Backend::available()
            );
        }
        _ => eprintln!(
            "FLASHCPU_EXPECT_DETECT unset: detected {detected}, available {:?}",
            Backend::available()
        ),
    }
}

#[test]
fn detect_and_available_agree() {
    let avail = Backend::available();
    let detected = Backend::detect();

    assert!(
        avail.contains(&Backend::Scalar),
        "Scalar must always be available"
    );
    assert!(
        avail.contains(&detected),
        "detect() = {detected} not in {avail:?}"
    );
    assert_eq!(
        detected,
        preferred(&avail),
        "detect() is not the fastest of {avail:?}"
    );
    assert_eq!(Backend::detect(), detected, "detect() is not stable");

    // available() is ALL filtered by is_available(), in ALL's (slowest-first) order.
    let filtered: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|b| b.is_available())
        .collect();
    assert_eq!(avail, filtered);
    for b in Backend::ALL {
        assert_eq!(
            b.require().is_ok(),
            avail.contains(&b),
            "{b}: require() vs available()"
        );
    }

    // Architecture: x86 and ARM backends never coexist.
    let x86 = avail.contains(&Backend::Avx2) || avail.contains(&Backend::Avx512);
    assert!(!(x86 && avail.contains(&Backend::Neon)), "{avail:?}");
    if cfg!(target_arch = "x86_64") {
        assert!(!avail.contains(&Backend::Neon));
        // pulp's V4 token implies V3.
        if avail.contains(&Backend::Avx512) {
            assert!(
                avail.contains(&Backend::Avx2),
                "AVX-512 without AVX2: {avail:?}"
            );
        }
    } else if cfg!(target_arch = "aarch64") {
        assert!(!x86);
        assert!(avail.contains(&Backend::Neon), "aarch64 always has NEON");
    } else {
        assert_eq!(avail, vec![Backend::Scalar]);
    }

    // The builder with no forced backend resolves to the detected one.
    assert_eq!(Attention::new().resolved_backend(), Ok(detected));
}

#[test]
fn names_round_trip() {
    for b in Backend::ALL {
        assert_eq!(b.to_string(), b.name());
        assert_eq!(b.name().parse::<Backend>(), Ok(b));
        assert_eq!(b.name().to_uppercase().parse::<Backend>(), Ok(b));
    }
    let err = "sse9".parse::<Backend>().unwrap_err();
    assert!(matches!(err, Error::Param { .. }), "{err:?}");
}

/// A tiny GQA problem with distinct rows, so a wrong head or key shows.
struct Tiny {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

const B: usize = 1;
const SQ: usize = 3;
const SKV: usize = 5;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 8;

impl Tiny {
    fn new() -> Self {
        let f = |n: usize, a: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * a).sin() * 2.0 * 8.0).round() / 8.0)
                .collect()
        };
        Tiny {
            q: f(B * SQ * HQ * D, 0.7),
            k: f(B * SKV * HKV * D, 1.3),
            v: f(B * SKV * HKV * D, 0.4),
        }
    }
    fn views(&self) -> (Tensor<'_, f32>, Tensor<'_, f32>, Tensor<'_, f32>) {
        (
            Tensor::bshd(&self.q, [B, SQ, HQ, D]).unwrap(),
            Tensor::bshd(&self.k, [B, SKV, HKV, D]).unwrap(),
            Tensor::bshd(&self.v, [B, SKV, HKV, D]).unwrap(),
        )
    }
}

#[test]
fn forcing_an_unavailable_backend_is_an_error() {
    let t = Tiny::new();
    let (q, k, v) = t.views();
    let unavailable: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|b| !b.is_available())
        .collect();
    if unavailable.is_empty() {
        // Cannot happen on one architecture (x86 lacks NEON, ARM lacks AVX); keep it loud.
        panic!("every backend is available: {:?}", Backend::available());
    }
    for b in unavailable {
        let attn = Attention::new().causal().backend(b);
        let mut o = vec![f32::NAN; B * SQ * HQ * D];
        let mut lse = vec![f32::NAN; B * HQ * SQ];

        let err = attn
            .forward(
                q,
                k,
                v,
                &mut TensorMut::bshd(&mut o, [B, SQ, HQ, D]).unwrap(),
            )
            .unwrap_err();
        match &err {
            Error::Backend { requested, msg } => {
                assert_eq!(*requested, b.name());
                assert!(
                    msg.contains("scalar"),
                    "message should list what is available: {msg}"
                );
            }
            other => panic!("forcing {b}: expected Error::Backend, got {other:?}"),
        }
        assert_eq!(err.arg(), "backend");
        assert!(err.to_string().contains(b.name()), "{err}");

        let err = attn
            .forward_with_lse(
                q,
                k,
                v,
                &mut TensorMut::bshd(&mut o, [B, SQ, HQ, D]).unwrap(),
                &mut lse,
            )
            .unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        assert!(matches!(
            attn.resolved_backend(),
            Err(Error::Backend { .. })
        ));
        assert!(matches!(b.require(), Err(Error::Backend { .. })));

        // Refused up front: nothing was written.
        assert!(
            o.iter().all(|x| x.is_nan()),
            "{b}: output written despite Err"
        );
        assert!(
            lse.iter().all(|x| x.is_nan()),
            "{b}: lse written despite Err"
        );
    }
}

#[test]
fn every_available_backend_runs_a_tiny_forward() {
    let t = Tiny::new();
    let (q, k, v) = t.views();
    let sinks = [0.5f32, f32::NEG_INFINITY, -1.0, 2.0];
    let slopes = [0.0f32, 0.25, 0.5, 1.0];
    let configs: [(&str, Attention<'_>); 4] = [
        ("plain", Attention::new()),
        ("causal", Attention::new().causal()),
        ("window+softcap", Attention::new().window(1, 0).softcap(2.0)),
        (
            "causal+alibi+sinks",
            Attention::new().causal().alibi(&slopes).sinks(&sinks),
        ),
    ];
    let vmax = t.v.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let tol = 1e-4 * (1.0 + vmax);
    let avail = Backend::available();
    eprintln!("running backends {avail:?}");
    for (name, attn) in configs {
        let r = reference::attention(&attn, q, k, v).unwrap();
        for &b in &avail {
            let mut o = vec![f32::NAN; B * SQ * HQ * D];
            let mut lse = vec![f32::NAN; B * HQ * SQ];
            attn.backend(b)
                .forward_with_lse(
                    q,
                    k,
                    v,
                    &mut TensorMut::bshd(&mut o, [B, SQ, HQ, D]).unwrap(),
                    &mut lse,
                )
                .unwrap_or_else(|e| panic!("{b} {name}: {e}"));
            for (i, (&x, &y)) in o.iter().zip(&r.out).enumerate() {
                assert!(
                    (x as f64 - y).abs() <= tol,
                    "{b} {name}: o[{i}] = {x}, reference {y}"
                );
            }
            for (i, (&x, &y)) in lse.iter().zip(&r.lse).enumerate() {
                assert!(
                    (x as f64 - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{b} {name}: lse[{i}] = {x}, reference {y}"
                );
            }

            // Plain forward (no LSE) writes the same output.
            let mut o2 = vec![f32::NAN; B * SQ * HQ * D];
            attn.backend(b)
                .forward(
                    q,
                    k,
                    v,
                    &mut TensorMut::bshd(&mut o2, [B, SQ, HQ, D]).unwrap(),
                )
                .unwrap();
            assert_eq!(
                o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                o2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{b} {name}: forward and forward_with_lse differ"
            );
        }
    }
}
