//! The plan API an engine drives itself (`Attention::plan`, `Plan::run`), adapted from an
//! independent review: items run in any order or from many threads give the bits of
//! `forward`; a second run of an item and indices out of range are errors, not panics;
//! plans dropped half-run and plans interleaved with each other leave later calls intact.

use crate::common;

use common::{BiasSpec, Case, DType, Layout, Rng, Sinks, backends, compare, run, tolerance};
use flashcpu::{Attention, Tensor, TensorMut, bf16, f16};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Several Q tiles with masks; multi-head decode with split-KV (one batch, and two:
/// items out of order switch a scratch between groups, whose Q rows it keeps for the
/// group's next split); single-head split-KV; one-wide head dims, BHSD output.
fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    v.push(Case::new(2, 1, 1100, 8, 2, 64, 64));
    let mut c = Case::new(2, 100, 130, 6, 2, 40, 24);
    c.causal = true;
    c.window = Some((50, 3));
    v.push(c);
    let mut c = Case::new(1, 1, 900, 10, 2, 64, 48);
    c.sinks = Some(Sinks::Mixed);
    c.softcap = Some(20.0);
    v.push(c);
    let mut c = Case::new(1, 1, 900, 1, 1, 32, 32);
    c.alibi = Some(0.01);
    c.bias = Some(BiasSpec {
        neg_inf: 0.2,
        ..BiasSpec::default()
    });
    v.push(c);
    let mut c = Case::new(1, 40, 40, 1, 1, 1, 3);
    c.lo = Layout::Bhsd;
    v.push(c);
    v
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn items_in_any_order_or_threads_give_the_bits_of_forward() {
    for (ci, c) in cases().into_iter().enumerate() {
        let c = Case {
            lo: Layout::Bshd,
            tq: DType::F32,
            tkv: DType::F32,
            to: DType::F32,
            lse: true,
            ..c
        };
        let data = c.data();
        let q = Tensor::from_strides(&data.q, [c.b, c.sq, c.hq, c.dqk], data.qs).unwrap();
        let k = Tensor::from_strides(&data.k, [c.b, c.skv, c.hkv, c.dqk], data.ks).unwrap();
        let v = Tensor::from_strides(data.v_buf(), [c.b, c.skv, c.hkv, c.dv], data.vs).unwrap();
        let oshape = [c.b, c.sq, c.hq, c.dv];
        let (n_out, n_lse) = (c.b * c.sq * c.hq * c.dv, c.b * c.hq * c.sq);
        for be in backends() {
            let attn = data.attention(&c).backend(be);
            let (mut o_ref, mut l_ref) = (vec![0.0f32; n_out], vec![0.0f32; n_lse]);
            let mut ov = TensorMut::bshd(&mut o_ref, oshape).unwrap();
            attn.threads(1)
                .forward_with_lse(q, k, v, &mut ov, &mut l_ref)
                .unwrap();
            for mode in 0..3 {
                let (mut o, mut l) = (vec![f32::NAN; n_out], vec![f32::NAN; n_lse]);
                {
                    let mut ov = TensorMut::bshd(&mut o, oshape).unwrap();
                    let plan = attn.plan(q, k, v, &mut ov, Some(&mut l)).unwrap();
                    let n = plan.len();
                    let mut order: Vec<usize> = (0..n).collect();
                    if mode == 0 {
                        order.reverse();
                    } else {
                        let mut r = Rng::new(ci as u64 * 7 + mode as u64);
                        for i in (1..n).rev() {
                            order.swap(i, r.range(0, i));
                        }
                    }
                    if mode == 2 {
                        // Eight engine threads claiming shuffled items.
                        let next = AtomicUsize::new(0);
                        let errs = AtomicUsize::new(0);
                        std::thread::scope(|s| {
                            for _ in 0..8 {
                                s.spawn(|| {
                                    loop {
                                        let i = next.fetch_add(1, Ordering::Relaxed);
                                        if i >= n {
                                            break;
                                        }
                                        if plan.run(order[i]).is_err() {
                                            errs.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                });
                            }
                        });
                        assert_eq!(errs.into_inner(), 0, "{be} case {ci}");
                    } else {
                        for &i in &order {
                            plan.run(i).unwrap();
                        }
                    }
                    for i in [0, n / 2, n - 1] {
                        assert!(plan.run(i).is_err(), "{be} case {ci}: second run({i})");
                    }
                    for i in [n, n + 1, usize::MAX] {
                        let r = catch_unwind(AssertUnwindSafe(|| plan.run(i)));
                        assert!(matches!(r, Ok(Err(_))), "{be} case {ci}: run({i})");
                    }
                }
                assert!(
                    bits(&o) == bits(&o_ref) && bits(&l) == bits(&l_ref),
                    "{be} case {ci} mode {mode}: plan result differs from forward"
                );
            }
        }
    }
    // An empty plan has no items.
    let e: [f32; 0] = [];
    let mut od: [f32; 0] = [];
    let mut ov = TensorMut::bshd(&mut od, [1, 0, 2, 4]).unwrap();
    let a = Attention::new();
    let plan = a
        .plan(
            Tensor::bshd(&e, [1, 0, 2, 4]).unwrap(),
            Tensor::bshd(&e, [1, 0, 1, 4]).unwrap(),
            Tensor::bshd(&e, [1, 0, 1, 4]).unwrap(),
            &mut ov,
            None,
        )
        .unwrap();
    assert!(plan.is_empty() && plan.run(0).is_err());
}

/// A plan dropped after running only some items (an engine aborting a step) does not
/// disturb later calls, which reuse its scratch and partial buffers.
#[test]
fn partly_run_plans_leave_later_calls_intact() {
    for be in backends() {
        let mut c = Case::new(1, 1, 1500, 8, 2, 64, 64);
        c.sinks = Some(Sinks::Random(1.0));
        let data = c.data();
        let want = data.reference(&c);
        let tol = tolerance(&c, &data);
        let q = Tensor::from_strides(&data.q, [1, 1, 8, 64], data.qs).unwrap();
        let k = Tensor::from_strides(&data.k, [1, 1500, 2, 64], data.ks).unwrap();
        let v = Tensor::from_strides(data.v_buf(), [1, 1500, 2, 64], data.vs).unwrap();
        for frac in [0usize, 1, 2, 3] {
            let mut o = vec![0.0f32; 8 * 64];
            let mut ov = TensorMut::bshd(&mut o, [1, 1, 8, 64]).unwrap();
            let attn = data.attention(&c).backend(be);
            let plan = attn.plan(q, k, v, &mut ov, None).unwrap();
            for i in (0..plan.len()).filter(|i| i % 4 < frac) {
                plan.run(i).unwrap();
            }
            drop(plan);
            let got = run(&c, &data, be).unwrap();
            if let Err(m) = compare(&c, &got, &want, tol) {
                panic!("{be} after a plan run {frac}/4: {m}");
            }
        }
    }
}

/// Two live plans whose items are interleaved each give the bits of their own forward.
#[test]
fn interleaved_plans_give_their_own_bits() {
    let mut r = Rng::new(8);
    let shapes = [
        (1usize, 900usize, 8usize, 2usize, 64usize),
        (100, 130, 2, 1, 32),
    ];
    let mut fill = |n: usize| (0..n).map(|_| r.sym()).collect::<Vec<f32>>();
    let bufs: Vec<_> = shapes
        .iter()
        .map(|&(sq, skv, hq, hkv, d)| (fill(sq * hq * d), fill(skv * hkv * d), fill(skv * hkv * d)))
        .collect();
    let view = |i: usize| {
        let (sq, skv, hq, hkv, d) = shapes[i];
        (
            Tensor::bshd(&bufs[i].0, [1, sq, hq, d]).unwrap(),
            Tensor::bshd(&bufs[i].1, [1, skv, hkv, d]).unwrap(),
            Tensor::bshd(&bufs[i].2, [1, skv, hkv, d]).unwrap(),
        )
    };
    for be in backends() {
        let attn = Attention::new().backend(be).causal();
        let mut want = Vec::new();
        for (i, &(sq, _, hq, _, d)) in shapes.iter().enumerate() {
            let (q, k, v) = view(i);
            let mut o = vec![0.0f32; sq * hq * d];
            let mut ov = TensorMut::bshd(&mut o, [1, sq, hq, d]).unwrap();
            attn.threads(1).forward(q, k, v, &mut ov).unwrap();
            want.push(o);
        }
        let (sq0, _, hq0, _, d0) = shapes[0];
        let (sq1, _, hq1, _, d1) = shapes[1];
        let mut o0 = vec![f32::NAN; sq0 * hq0 * d0];
        let mut o1 = vec![f32::NAN; sq1 * hq1 * d1];
        {
            let mut ov0 = TensorMut::bshd(&mut o0, [1, sq0, hq0, d0]).unwrap();
            let mut ov1 = TensorMut::bshd(&mut o1, [1, sq1, hq1, d1]).unwrap();
            let ((q0, k0, v0), (q1, k1, v1)) = (view(0), view(1));
            let p0 = attn.plan(q0, k0, v0, &mut ov0, None).unwrap();
            let p1 = attn.plan(q1, k1, v1, &mut ov1, None).unwrap();
            for i in 0..p0.len().max(p1.len()) {
                if i < p1.len() {
                    p1.run(p1.len() - 1 - i).unwrap();
                }
                if i < p0.len() {
                    p0.run(i).unwrap();
                }
            }
        }
        assert_eq!(bits(&o0), bits(&want[0]), "{be}: plan 0");
        assert_eq!(bits(&o1), bits(&want[1]), "{be}: plan 1");
    }
}

/// A plan can be shared by an engine's threads; the builder and views move between them.
#[test]
fn auto_traits() {
    fn sync<T: Sync>() {}
    fn send<T: Send>() {}
    sync::<flashcpu::Plan<'static, f32, f16, bf16>>();
    sync::<Attention<'static>>();
    send::<Attention<'static>>();
    sync::<Tensor<'static, f32>>();
    send::<TensorMut<'static, bf16>>();
}
