//! Invalid input is an `Err` naming the argument, never a panic.

use crate::common;

use flashcpu::{Attention, Backend, Bias, Error, Tensor, TensorMut, reference};
use std::panic::{AssertUnwindSafe, catch_unwind};

// A valid base call: b 2, sq 3, skv 5, hq 4, hkv 2, d_qk 8, d_v 6.
const B: usize = 2;
const SQ: usize = 3;
const SKV: usize = 5;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 8;
const DV: usize = 6;

/// Generous zero buffers, so shapes and strides decide what is valid.
struct Bufs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    bias: Vec<f32>,
}

impl Bufs {
    fn new() -> Self {
        Bufs {
            q: vec![0.0; B * SQ * HQ * D],
            k: vec![0.0; B * SKV * HKV * D],
            v: vec![0.0; B * SKV * HKV * DV],
            o: vec![0.0; B * SQ * HQ * DV],
            bias: vec![0.0; B * HQ * SQ * SKV],
        }
    }
}

/// Forward with the given shapes over `Bufs`-sized data (views are built with `?`, so a
/// constructor error comes back as is). Also checks that `reference::attention` reports
/// the same error when the problem is one it validates (not `o` or `lse`).
#[allow(clippy::too_many_arguments)]
fn call(
    attn: Attention<'_>,
    qs: [usize; 4],
    ks: [usize; 4],
    vs: [usize; 4],
    os: [usize; 4],
    lse_len: Option<usize>,
) -> flashcpu::Result<()> {
    let mut b = Bufs::new();
    let big = |n: usize| vec![0.0f32; n.max(1)];
    let (qd, kd, vd) = (
        big(qs.iter().product::<usize>().max(b.q.len())),
        big(ks.iter().product::<usize>().max(b.k.len())),
        big(vs.iter().product::<usize>().max(b.v.len())),
    );
    b.o = big(os.iter().product::<usize>().max(b.o.len()));
    let q = Tensor::bshd(&qd, qs)?;
    let k = Tensor::bshd(&kd, ks)?;
    let v = Tensor::bshd(&vd, vs)?;
    let r = reference::attention(&attn, q, k, v);
    let mut o = TensorMut::bshd(&mut b.o, os)?;
    let res = match lse_len {
        Some(n) => attn.forward_with_lse(q, k, v, &mut o, &mut vec![0.0; n]),
        None => attn.forward(q, k, v, &mut o),
    };
    // The reference validates q, k, v and the parameters, not o, lse or the backend.
    if let Err(e) = &res
        && !matches!(e.arg(), "o" | "lse" | "backend")
    {
        assert_eq!(r.as_ref().err(), Some(e), "reference and forward disagree");
    }
    res
}

const QS: [usize; 4] = [B, SQ, HQ, D];
const KS: [usize; 4] = [B, SKV, HKV, D];
const VS: [usize; 4] = [B, SKV, HKV, DV];
const OS: [usize; 4] = [B, SQ, HQ, DV];

fn ok_call(attn: Attention<'_>) -> flashcpu::Result<()> {
    call(attn, QS, KS, VS, OS, Some(B * HQ * SQ))
}

type Check = Box<dyn Fn() -> flashcpu::Result<()>>;

const BIAS_SHAPE: [usize; 4] = [B, HQ, SQ, SKV];

fn a() -> Attention<'static> {
    Attention::new()
}

#[test]
fn invalid_inputs_are_errors_naming_the_argument() {
    let bufs = Bufs::new();
    let bias_with = |shape: [usize; 4], bad: Option<f32>| -> Check {
        Box::new(move || {
            let mut data = vec![0.0f32; shape.iter().product::<usize>().max(1)];
            if let Some(x) = bad {
                data[7] = x;
            }
            ok_call(a().bias(Bias::new(&data, shape)?))
        })
    };
    let other_backend = common::unavailable_backend();
    let q_len = bufs.q.len();
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, &str, Check)> = vec![
        ("the base call is valid", "", "", Box::new(|| ok_call(a()))),
        ("q/k batch mismatch", "k", "batch", Box::new(|| call(a(), QS, [1, SKV, HKV, D], VS, OS, None))),
        ("k head dim mismatch", "k", "head dim", Box::new(|| call(a(), QS, [B, SKV, HKV, D + 1], VS, OS, None))),
        ("hq % hkv != 0", "k", "multiple", Box::new(|| call(a(), QS, [B, SKV, 3, D], [B, SKV, 3, DV], OS, None))),
        ("hkv = 0", "k", "at least 1", Box::new(|| call(a(), QS, [B, SKV, 0, D], [B, SKV, 0, DV], OS, None))),
        ("v seq mismatch", "v", "seq_kv", Box::new(|| call(a(), QS, KS, [B, SKV + 1, HKV, DV], OS, None))),
        ("v heads mismatch", "v", "heads_kv", Box::new(|| call(a(), QS, KS, [B, SKV, 1, DV], OS, None))),
        ("v batch mismatch", "v", "batch", Box::new(|| call(a(), QS, KS, [1, SKV, HKV, DV], OS, None))),
        ("d_qk = 0", "q", "d_qk", Box::new(|| call(a(), [B, SQ, HQ, 0], [B, SKV, HKV, 0], VS, OS, None))),
        ("d_v = 0", "v", "d_v", Box::new(|| call(a(), QS, KS, [B, SKV, HKV, 0], [B, SQ, HQ, 0], None))),
        ("o shape mismatch", "o", "expected", Box::new(|| call(a(), QS, KS, VS, [B, SQ, HQ, DV + 1], None))),
        ("o in BHSD order", "o", "expected", Box::new(|| call(a(), QS, KS, VS, [B, HQ, SQ, DV], None))),
        ("lse too short", "lse", "entries", Box::new(|| call(a(), QS, KS, VS, OS, Some(B * HQ * SQ - 1)))),
        ("lse too long", "lse", "entries", Box::new(|| call(a(), QS, KS, VS, OS, Some(B * HQ * SQ + 1)))),
        ("q head-dim stride != 1", "tensor", "head-dim stride", Box::new(|| {
            Tensor::from_strides(&Bufs::new().q, [1, 1, 1, 2], [4, 4, 4, 2]).map(|_| ())
        })),
        ("o head-dim stride != 1", "o", "head-dim stride", Box::new(|| {
            TensorMut::from_strides(&mut Bufs::new().o, [1, 1, 1, 2], [4, 4, 4, 2]).map(|_| ())
        })),
        ("bias seq_kv stride != 1", "bias", "seq_kv stride", Box::new(|| {
            Bias::from_strides(&Bufs::new().bias, [1, 1, 1, 2], [4, 4, 4, 2]).map(|_| ())
        })),
        ("q past the buffer", "tensor", "reaches element", Box::new(move || {
            Tensor::bshd(&vec![0.0f32; q_len - 1], QS).map(|_| ())
        })),
        ("k strides past the buffer", "tensor", "reaches element", Box::new(|| {
            Tensor::from_strides(&Bufs::new().k, KS, [SKV * HKV * D, HKV * D + 1, D, 1]).map(|_| ())
        })),
        ("v strides past the buffer (BHSD)", "tensor", "reaches element", Box::new(|| {
            Tensor::bhsd(&Bufs::new().v, [B, HKV + 1, SKV, DV]).map(|_| ())
        })),
        ("o past the buffer", "o", "reaches element", Box::new(|| {
            TensorMut::from_strides(&mut Bufs::new().o, OS, [SQ * HQ * DV + 1, HQ * DV, DV, 1]).map(|_| ())
        })),
        ("bias past the buffer", "bias", "reaches element", Box::new(|| {
            Bias::from_strides(&Bufs::new().bias, BIAS_SHAPE, [HQ * SQ * SKV, SQ * SKV, SKV + 1, 1]).map(|_| ())
        })),
        ("overlapping output rows", "o", "overlap", Box::new(|| {
            TensorMut::from_strides(&mut Bufs::new().o, OS, [SQ * HQ * DV, HQ * DV, DV - 1, 1]).map(|_| ())
        })),
        ("output seq stride 0", "o", "overlap", Box::new(|| {
            TensorMut::from_strides(&mut Bufs::new().o, OS, [SQ * HQ * DV, 0, DV, 1]).map(|_| ())
        })),
        ("output batch aliasing heads", "o", "overlap", Box::new(|| {
            TensorMut::from_strides(&mut Bufs::new().o, OS, [DV, HQ * DV, DV, 1]).map(|_| ())
        })),
        ("q strides overflow usize", "tensor", "overflow", Box::new(|| {
            Tensor::from_strides(&Bufs::new().q, QS, [1, usize::MAX / 2 + 1, 1, 1]).map(|_| ())
        })),
        ("q shape overflows usize", "tensor", "overflow", Box::new(|| {
            Tensor::bshd(&Bufs::new().q, [2, usize::MAX / 2, 3, 8]).map(|_| ())
        })),
        ("o strides overflow usize", "o", "overflow", Box::new(|| {
            TensorMut::from_strides(&mut Bufs::new().o, OS, [1, usize::MAX, 1, 1]).map(|_| ())
        })),
        ("bias strides overflow usize", "bias", "overflow", Box::new(|| {
            Bias::from_strides(&Bufs::new().bias, BIAS_SHAPE, [0, 0, usize::MAX / 2 + 1, 1]).map(|_| ())
        })),
        ("scale NaN", "scale", "finite and > 0", Box::new(|| ok_call(a().scale(f32::NAN)))),
        ("scale 0", "scale", "finite and > 0", Box::new(|| ok_call(a().scale(0.0)))),
        ("scale -0", "scale", "finite and > 0", Box::new(|| ok_call(a().scale(-0.0)))),
        ("scale negative", "scale", "finite and > 0", Box::new(|| ok_call(a().scale(-0.5)))),
        ("scale +inf", "scale", "finite and > 0", Box::new(|| ok_call(a().scale(f32::INFINITY)))),
        ("softcap NaN", "softcap", "finite and > 0", Box::new(|| ok_call(a().softcap(f32::NAN)))),
        ("softcap 0", "softcap", "finite and > 0", Box::new(|| ok_call(a().softcap(0.0)))),
        ("softcap negative", "softcap", "finite and > 0", Box::new(|| ok_call(a().softcap(-3.0)))),
        ("softcap +inf", "softcap", "finite and > 0", Box::new(|| ok_call(a().softcap(f32::INFINITY)))),
        ("alibi too short", "alibi", "one slope per query head", Box::new(|| ok_call(a().alibi(&[0.5; HQ - 1])))),
        ("alibi too long", "alibi", "one slope per query head", Box::new(|| ok_call(a().alibi(&[0.5; HQ + 1])))),
        ("alibi NaN slope", "alibi", "must be finite", Box::new(|| ok_call(a().alibi(&[0.5, 0.5, f32::NAN, 0.5])))),
        ("alibi inf slope", "alibi", "must be finite", Box::new(|| ok_call(a().alibi(&[f32::NEG_INFINITY, 0.5, 0.5, 0.5])))),
        ("alibi slope past f32 with the distance", "alibi", "f32::MAX / 2", Box::new(|| ok_call(a().alibi(&[0.5, 1e38, 0.5, 0.5])))),
        ("sinks too short", "sinks", "one logit per query head", Box::new(|| ok_call(a().sinks(&[0.0; HQ - 1])))),
        ("sinks empty", "sinks", "one logit per query head", Box::new(|| ok_call(a().sinks(&[])))),
        ("sinks NaN", "sinks", "finite or -inf", Box::new(|| ok_call(a().sinks(&[0.0, f32::NAN, 0.0, 0.0])))),
        ("sinks +inf", "sinks", "finite or -inf", Box::new(|| ok_call(a().sinks(&[0.0, 0.0, 0.0, f32::INFINITY])))),
        ("bias batch not broadcastable", "bias", "does not broadcast", bias_with([B + 1, HQ, SQ, SKV], None)),
        ("bias heads not broadcastable", "bias", "does not broadcast", bias_with([B, HKV, SQ, SKV], None)),
        ("bias seq_q mismatch", "bias", "does not broadcast", bias_with([1, 1, SQ + 1, SKV], None)),
        ("bias seq_kv mismatch", "bias", "does not broadcast", bias_with([1, 1, SQ, SKV - 1], None)),
        ("bias NaN entry", "bias", "must be finite or -inf", bias_with([1, HQ, SQ, SKV], Some(f32::NAN))),
        ("bias +inf entry", "bias", "must be finite or -inf", bias_with([B, 1, SQ, SKV], Some(f32::INFINITY))),
        ("forced backend unavailable", "backend", "not available", Box::new(move || match other_backend {
            Some(be) => ok_call(a().backend(be)),
            None => Err(Error::Backend { requested: "none", msg: "every backend is available here: not available".into() }),
        })),
    ];

    let mut failures = Vec::new();
    for (name, arg, needle, f) in &cases {
        let res = catch_unwind(AssertUnwindSafe(f));
        let msg = match (res, arg.is_empty()) {
            (Err(_), _) => Some("panicked".to_string()),
            (Ok(Ok(())), true) => None,
            (Ok(Err(e)), true) => Some(format!("expected Ok, got Err({e})")),
            (Ok(Ok(())), false) => Some("expected Err, got Ok".to_string()),
            (Ok(Err(e)), false) => {
                let text = e.to_string();
                if e.arg() != *arg || !text.contains(needle) || !text.contains(&format!("`{arg}`"))
                {
                    Some(format!(
                        "got arg {:?}, message {text:?}; want arg {arg:?} and {needle:?}",
                        e.arg()
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(m) = msg {
            failures.push(format!("{name}: {m}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Validation happens before any backend work: a forced, unavailable backend does not
/// hide a shape error, and the error type is the documented variant.
#[test]
fn error_variants() {
    let e = call(Attention::new(), QS, [1, SKV, HKV, D], VS, OS, None).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "k", .. }), "{e:?}");
    let e = ok_call(Attention::new().scale(f32::NAN)).unwrap_err();
    assert!(matches!(e, Error::Param { arg: "scale", .. }), "{e:?}");
    let e = Tensor::from_strides(&[0.0f32; 4], [1, 1, 1, 4], [0, 0, 0, 2]).unwrap_err();
    assert!(matches!(e, Error::Stride { .. }), "{e:?}");
    if let Some(be) = common::unavailable_backend() {
        let e = ok_call(Attention::new().backend(be)).unwrap_err();
        assert!(
            matches!(e, Error::Backend { requested, .. } if requested == be.name()),
            "{e:?}"
        );
        assert!(
            e.to_string().contains(Backend::Scalar.name()),
            "lists what is available: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// No input panics.
// ---------------------------------------------------------------------------------------

fn pick_dim(r: &mut common::Rng) -> usize {
    match r.range(0, 19) {
        0..=11 => r.range(0, 4),
        12..=15 => r.range(5, 70),
        16 => usize::MAX,
        17 => usize::MAX / 2 + 1,
        _ => 1 << 33,
    }
}

fn pick_stride(r: &mut common::Rng) -> usize {
    match r.range(0, 9) {
        0 => 0,
        1..=5 => r.range(1, 64),
        6 => usize::MAX,
        7 => usize::MAX / 3,
        _ => 1 << 40,
    }
}

fn pick_f32(r: &mut common::Rng) -> f32 {
    *[
        1.0,
        0.125,
        -1.0,
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-45,
        1e30,
        -1e30,
        3.0,
    ]
    .get(r.range(0, 14))
    .unwrap()
}

/// A shape that is usually `like` (consistent with the other views, so validation gets
/// deep), sometimes with junk dims; strides usually dense, sometimes junk; a buffer that
/// usually fits exactly.
fn garbage_view(r: &mut common::Rng, like: [usize; 4]) -> ([usize; 4], [usize; 4], usize) {
    let mut shape = like;
    for s in shape.iter_mut() {
        if r.chance(0.07) {
            *s = pick_dim(r);
        }
    }
    let dense = [
        shape[1].saturating_mul(shape[2]).saturating_mul(shape[3]),
        shape[2].saturating_mul(shape[3]),
        shape[3],
        1,
    ];
    let strides = if r.chance(0.75) {
        dense
    } else {
        [
            pick_stride(r),
            pick_stride(r),
            pick_stride(r),
            if r.chance(0.9) { 1 } else { pick_stride(r) },
        ]
    };
    let need = shape
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .unwrap_or(usize::MAX);
    let len = if need <= 4096 && r.chance(0.85) {
        need
    } else {
        r.range(0, 300)
    };
    (shape, strides, len)
}

/// Runs thousands (`FLASHCPU_GARBAGE_ITERS`, default 20000) of random, mostly invalid, calls through the constructors, `forward`,
/// `forward_with_lse` and `reference::attention`, and asserts none panics.
#[test]
fn garbage_never_panics() {
    let iters = std::env::var("FLASHCPU_GARBAGE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000u64);
    // Thousands of expected-to-be-caught panics would flood the log: silence the panic
    // hook for this test's thread only (they are collected and reported below).
    let me = std::thread::current().id();
    let prev: std::sync::Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        std::panic::take_hook().into();
    let chained = prev.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != me {
            chained(info);
        }
    }));
    let mut panics = Vec::new();
    let (mut ok, mut err) = (0usize, 0usize);
    for seed in 0..iters {
        let mut r = common::Rng::new(seed);
        let mut log = String::new();
        let res = catch_unwind(AssertUnwindSafe(|| {
            // Small consistent sizes, then views that mostly follow them.
            let (b, sq, skv, hkv) = (r.range(0, 3), r.range(0, 6), r.range(0, 6), r.range(1, 3));
            let (hq, dqk, dv) = (hkv * r.range(0, 3), r.range(1, 9), r.range(1, 9));
            let (qs, qst, ql) = garbage_view(&mut r, [b, sq, hq, dqk]);
            let (ks, kst, kl) = garbage_view(&mut r, [b, skv, hkv, dqk]);
            let (vs, vst, vl) = garbage_view(&mut r, [b, skv, hkv, dv]);
            let (os, ost, ol) = garbage_view(&mut r, [b, sq, hq, dv]);
            let (qd, kd, vd) = (vec![0.5f32; ql], vec![0.25f32; kl], vec![1.0f32; vl]);
            let mut od = vec![0.0f32; ol];
            let mut a = Attention::new();
            let (slopes, sinks): (Vec<f32>, Vec<f32>) = (
                (0..hq + r.range(0, 1))
                    .map(|_| if r.chance(0.8) { 0.5 } else { pick_f32(&mut r) })
                    .collect(),
                (0..hq + r.range(0, 1))
                    .map(|_| if r.chance(0.8) { 0.5 } else { pick_f32(&mut r) })
                    .collect(),
            );
            let bias_like = [
                if r.chance(0.3) { 1 } else { b },
                if r.chance(0.3) { 1 } else { hq },
                sq,
                skv,
            ];
            let (bs, bst, bl) = garbage_view(&mut r, bias_like);
            let bd: Vec<f32> = (0..bl)
                .map(|_| if r.chance(0.9) { 0.5 } else { pick_f32(&mut r) })
                .collect();
            if r.chance(0.3) {
                a = a.scale(pick_f32(&mut r).abs());
            }
            if r.chance(0.3) {
                a = a.causal();
            }
            if r.chance(0.3) {
                a = a.window(pick_dim(&mut r), pick_dim(&mut r));
            }
            if r.chance(0.2) {
                a = a.softcap(pick_f32(&mut r));
            }
            if r.chance(0.2) {
                a = a.alibi(&slopes);
            }
            if r.chance(0.2) {
                a = a.sinks(&sinks);
            }
            if r.chance(0.3) {
                a = a.backend(Backend::ALL[r.range(0, 3)]);
            }
            if r.chance(0.3) {
                a = a.threads(r.range(0, 3));
            }
            log = format!(
                "q {qs:?}/{qst:?}/{ql}, k {ks:?}/{kst:?}/{kl}, v {vs:?}/{vst:?}/{vl}, o {os:?}/{ost:?}/{ol}, \
                 bias {bs:?}/{bst:?}/{bl}, {a:?}"
            );
            let use_bias = r.chance(0.3);
            let lse_len = if r.chance(0.7) {
                qs[0]
                    .checked_mul(qs[1])
                    .and_then(|x| x.checked_mul(qs[2]))
                    .unwrap_or(0)
            } else {
                r.range(0, 50)
            };
            let with_lse = r.chance(0.5) && lse_len <= 1 << 16;
            log += &format!(", use_bias {use_bias}, lse {with_lse}/{lse_len}");
            let res: flashcpu::Result<()> = (|| {
                let q = Tensor::from_strides(&qd, qs, qst)?;
                let k = Tensor::from_strides(&kd, ks, kst)?;
                let v = Tensor::from_strides(&vd, vs, vst)?;
                let mut o = TensorMut::from_strides(&mut od, os, ost)?;
                if use_bias {
                    a = a.bias(Bias::from_strides(&bd, bs, bst)?);
                }
                // Bound the work (shapes may be huge where another dim is 0).
                let [b, sq, hq, dqk] = q.shape();
                let [_, skv, _, dv] = v.shape();
                let sat = |xs: &[usize]| xs.iter().fold(1usize, |p, &x| p.saturating_mul(x));
                let fwd_work =
                    sat(&[b, sq, hq, skv.max(1), dqk.saturating_add(dv)]).max(if use_bias {
                        sat(&[bs[0], bs[1], bs[2].max(1)])
                    } else {
                        0
                    });
                if fwd_work > 1 << 22 {
                    return Ok(());
                }
                let ref_work = sat(&[b, hq.max(1), sq.max(1), skv.max(1), dqk.saturating_add(dv)]);
                if ref_work <= 1 << 22 {
                    let _ = reference::attention(&a, q, k, v);
                }
                if with_lse {
                    a.forward_with_lse(q, k, v, &mut o, &mut vec![0.0; lse_len])
                } else {
                    a.forward(q, k, v, &mut o)
                }
            })();
            res.is_ok()
        }));
        match res {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("seed {seed}: {what}\n    {log}"));
            }
        }
    }
    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| prev(info)));
    eprintln!(
        "{iters} random calls: {ok} Ok, {err} Err, {} panics",
        panics.len()
    );
    panics.truncate(20);
    assert!(
        panics.is_empty(),
        "{} calls panicked:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

/// Regression: a bias over an empty key range (`seq_kv = 0`) with strides that would
/// reach past its (empty) buffer is a valid view, and must not panic in validation.
#[test]
fn bias_over_empty_kv_range_does_not_panic() {
    let (q, k) = (vec![0.0f32; 2 * 4], Vec::<f32>::new());
    let mut o = vec![1.0f32; 2 * 4];
    let bias = Bias::from_strides(&[], [1, 1, 2, 0], [0, 0, 100, 1]).expect("empty view is valid");
    let attn = Attention::new().bias(bias);
    let qt = Tensor::bshd(&q, [1, 2, 1, 4]).unwrap();
    let kt = Tensor::bshd(&k, [1, 0, 1, 4]).unwrap();
    let res = catch_unwind(AssertUnwindSafe(|| {
        let r = attn.forward(
            qt,
            kt,
            kt,
            &mut TensorMut::bshd(&mut o, [1, 2, 1, 4]).unwrap(),
        );
        let rr = reference::attention(&attn, qt, kt, kt).map(|_| ());
        (r, rr)
    }));
    let (r, rr) = res.expect("panicked");
    r.unwrap();
    rr.unwrap();
    assert!(o.iter().all(|&x| x == 0.0), "no key: zeros");
}

/// Regression: shapes with a zero dimension are valid over an empty buffer whatever the
/// other dimensions are, so size arithmetic on them must not overflow (panic in debug).
#[test]
fn huge_shapes_with_a_zero_dim_do_not_overflow() {
    let big = usize::MAX / 2 + 1;
    for (qs, ks) in [
        ([2, big, 0, 4], [2, 0, 1, 4]),   // b·sq overflows; hq = 0
        ([0, big, big, 4], [0, 3, 1, 4]), // sq·hq overflows; b = 0
        ([big, 3, 0, 4], [big, 0, 1, 4]), // b·sq·... with hq = 0
    ] {
        let e: [f32; 0] = [];
        let q = Tensor::from_strides(&e, qs, [0, 0, 0, 1]).unwrap();
        let k = Tensor::from_strides(&e, ks, [0, 0, 0, 1]).unwrap();
        let mut od: [f32; 0] = [];
        let mut o =
            TensorMut::from_strides(&mut od, [qs[0], qs[1], qs[2], 4], [0, 0, 0, 1]).unwrap();
        for be in common::backends() {
            let res = catch_unwind(AssertUnwindSafe(|| {
                let a = Attention::new().backend(be);
                let r1 = a.forward(q, k, k, &mut o);
                let r2 = a.forward_with_lse(q, k, k, &mut o, &mut []);
                (r1, r2)
            }));
            let (r1, r2) = res.unwrap_or_else(|_| panic!("{be}: q {qs:?} k {ks:?} panicked"));
            r1.unwrap();
            r2.unwrap();
        }
        let res = catch_unwind(AssertUnwindSafe(|| {
            reference::attention(&Attention::new(), q, k, k).map(|_| ())
        }));
        assert!(res.is_ok(), "reference: q {qs:?} k {ks:?} panicked");
    }
}

/// Regression: a view whose furthest element is exactly `usize::MAX` must be rejected
/// (its extent, `usize::MAX + 1`, does not fit in usize), not overflow or wrap to an
/// extent of 0 that any buffer "holds".
#[test]
fn view_reaching_usize_max_is_rejected() {
    let s = usize::MAX / 5; // 5·s = usize::MAX exactly
    let data = [0.0f32; 1];
    let shape = [1, 6, 1, 1];
    let strides = [0, s, 0, 1];
    let r = catch_unwind(AssertUnwindSafe(|| {
        Tensor::from_strides(&data, shape, strides).map(|_| ())
    }));
    let e = r
        .expect("Tensor::from_strides panicked")
        .expect_err("view reaching usize::MAX accepted");
    assert_eq!(e.arg(), "tensor");
    let mut out = [0.0f32; 1];
    let r = catch_unwind(AssertUnwindSafe(|| {
        TensorMut::from_strides(&mut out, shape, strides).map(|_| ())
    }));
    assert_eq!(
        r.expect("TensorMut::from_strides panicked")
            .unwrap_err()
            .arg(),
        "o"
    );
    let r = catch_unwind(AssertUnwindSafe(|| {
        Bias::from_strides(&data, [1, 1, 6, 1], [0, 0, s, 1]).map(|_| ())
    }));
    assert_eq!(
        r.expect("Bias::from_strides panicked").unwrap_err().arg(),
        "bias"
    );
}

/// Regression (independent review): zero strides make a K/V view of any length legal;
/// seq_kv past the documented bound (2^32 - 1) is an error, not a wrapped size (which
/// once aborted the process on an allocation of 2^58 bytes) or an endless loop.
#[test]
fn seq_kv_past_the_bound_is_an_error() {
    let (q, kv) = (vec![0.5f32; 4], vec![0.25f32; 4]);
    for skv in [usize::MAX, 1 << 62, (u32::MAX as usize) + 1] {
        for be in common::backends() {
            let mut o = vec![0.0f32; 4];
            let kt = Tensor::from_strides(&kv, [1, skv, 1, 4], [0, 0, 0, 1]).unwrap();
            let res = catch_unwind(AssertUnwindSafe(|| {
                Attention::new().backend(be).forward(
                    Tensor::bshd(&q, [1, 1, 1, 4]).unwrap(),
                    kt,
                    kt,
                    &mut TensorMut::bshd(&mut o, [1, 1, 1, 4]).unwrap(),
                )
            }));
            let e = res.expect("panicked").unwrap_err();
            assert!(
                matches!(e, Error::Shape { arg: "k", .. }),
                "{skv} {be}: {e:?}"
            );
            let attn = Attention::new();
            let e = reference::attention(&attn, Tensor::bshd(&q, [1, 1, 1, 4]).unwrap(), kt, kt)
                .unwrap_err();
            assert!(
                matches!(e, Error::Shape { arg: "k", .. }),
                "reference {skv}: {e:?}"
            );
        }
    }
}
