//! Property test: every available backend, forced one by one, agrees with the f64
//! reference over random shapes, layouts, masks, modifiers and storage types.
//!
//! `PROPTEST_CASES` overrides the case count (default 96 per backend);
//! `FLASHCPU_PROPTEST_SEED` (a u64) changes the otherwise fixed seed.

use crate::common;

use common::{BiasSpec, Case, DTYPES, Layout, Sinks};
use flashcpu::Backend;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        3 => Just(Layout::Bshd),
        2 => Just(Layout::Bhsd),
        2 => (0u8..6, 0usize..5, 0usize..7, 0usize..9).prop_map(
            |(order, row_pad, mid_pad, outer_pad)| Layout::Strided { order, row_pad, mid_pad, outer_pad }
        ),
    ]
}

/// `(b, sq, skv, hq, hkv, dqk, dv)`: mostly small head dims, sometimes 161..=576 with
/// shorter sequences and fewer heads.
fn dims() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, usize)> {
    (prop::bool::weighted(0.12), prop::bool::weighted(0.2)).prop_flat_map(|(big, mqa)| {
        let (sq, skv, d) = if big {
            (8usize, 40usize, 161usize..=576)
        } else {
            (70, 140, 1..=160)
        };
        let heads = if mqa {
            (Just(1usize), 2usize..=if big { 8 } else { 16 }).boxed()
        } else {
            (
                1usize..=if big { 2 } else { 4 },
                prop_oneof![Just(1usize), Just(2), Just(3), Just(4)],
            )
                .boxed()
        };
        let dv = if big { 1usize..=576 } else { 1..=160 };
        (1usize..=3, 0..=sq, 0..=skv, heads, d, dv)
            .prop_map(|(b, sq, skv, (hkv, g), dqk, dv)| (b, sq, skv, hkv * g, hkv, dqk, dv))
    })
}

fn window_side() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..=20, 1 => 0usize..=200, 1 => Just(usize::MAX)]
}

fn bias() -> impl Strategy<Value = BiasSpec> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0.0f32), Just(0.1), Just(0.5), Just(1.0)],
        prop_oneof![3 => Just(0.0f32), 1 => Just(0.3)],
        prop_oneof![Just(1.0f32), Just(8.0)],
        prop_oneof![Just(0usize), 1usize..5],
    )
        .prop_map(
            |(batch_1, heads_1, neg_inf, neg_inf_rows, amp, row_pad)| BiasSpec {
                batch_1,
                heads_1,
                neg_inf,
                neg_inf_rows,
                amp,
                row_pad,
            },
        )
}

fn sinks() -> impl Strategy<Value = Sinks> {
    prop_oneof![
        2 => (0.1f32..5.0).prop_map(Sinks::Random),
        1 => Just(Sinks::Mixed),
        1 => Just(Sinks::All(f32::NEG_INFINITY)),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let shape = (
        dims(),
        layout(),
        layout(),
        layout(),
        layout(),
        prop::bool::weighted(0.15),
    );
    let mask = (
        any::<bool>(),
        prop::option::weighted(0.4, (window_side(), window_side())),
    );
    let mods = (
        prop_oneof![2 => Just(None), 1 => Just(Some(1.0f32)), 1 => (0.01f32..2.0).prop_map(Some)],
        prop::option::weighted(0.25, 0.5f32..50.0),
        prop::option::weighted(0.25, 0.05f32..1.0),
        prop::option::weighted(0.3, bias()),
        prop::option::weighted(0.25, sinks()),
    );
    let dtype = prop_oneof![4 => Just(0usize), 3 => 1..DTYPES.len()];
    let misc = (
        dtype,
        any::<bool>(),
        prop_oneof![Just(0usize), Just(1)],
        prop_oneof![3 => Just(1.0f32), 1 => 0.1f32..4.0],
        any::<u64>(),
    );
    (shape, mask, mods, misc).prop_map(
        |(
            ((b, sq, skv, hq, hkv, dqk, dv), lq, lk, lv, lo, alias),
            (causal, window),
            (scale, softcap, alibi, bias, sinks),
            (dt, lse, threads, amp, seed),
        )| {
            let (tq, tkv, to) = DTYPES[dt];
            Case {
                lq,
                lk,
                lv,
                lo,
                v_alias_k: alias && dv <= dqk,
                tq,
                tkv,
                to,
                causal,
                window,
                scale,
                softcap,
                alibi,
                bias,
                sinks,
                lse,
                threads,
                amp: [amp, amp, 1.0],
                seed,
                ..Case::new(b, sq, skv, hq, hkv, dqk, dv)
            }
        },
    )
}

fn seed_for(backend: Backend) -> [u8; 32] {
    let base: u64 = std::env::var("FLASHCPU_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0x00F1_A5C0);
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&base.to_le_bytes());
    seed[8] = backend as u8;
    seed
}

fn matches_reference(backend: Backend) {
    if !common::runs_here(backend) {
        return;
    }
    let config = Config {
        cases: common::proptest_cases(96),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_for(backend));
    let mut runner = TestRunner::new_with_rng(config, rng);
    let worst = std::cell::Cell::new(common::Errors::default());
    let result = runner.run(&case(), |c| {
        let data = c.data();
        let want = data.reference(&c);
        let e = common::check_on(&c, &data, &want, backend)
            .map_err(|msg| TestCaseError::fail(format!("backend {}: {msg}", backend.name())))?;
        let w = worst.get();
        worst.set(common::Errors {
            out: w.out.max(e.out),
            lse: w.lse.max(e.lse),
        });
        Ok(())
    });
    match result {
        Ok(()) => eprintln!(
            "{}: {} cases agree with the reference (worst |Δo| {:.2e}, |Δlse| {:.2e})",
            backend.name(),
            runner.config().cases,
            worst.get().out,
            worst.get().lse
        ),
        Err(TestError::Fail(why, c)) => {
            panic!(
                "backend {} disagrees with the reference: {why}\nminimal case: {c:#?}",
                backend.name()
            )
        }
        Err(e) => panic!("backend {}: {e}", backend.name()),
    }
}

#[test]
fn reference_scalar() {
    matches_reference(Backend::Scalar);
}

#[test]
fn reference_avx2() {
    matches_reference(Backend::Avx2);
}

#[test]
fn reference_avx512() {
    matches_reference(Backend::Avx512);
}

#[test]
fn reference_neon() {
    matches_reference(Backend::Neon);
}
