//! View construction with arbitrary (huge, overflowing, zero) shapes and strides over
//! small buffers: never a panic, and `Ok` exactly when an independent oracle says so:
//! - inputs (`Tensor`, `Bias`): the last stride is 1 and every addressable element lies
//!   inside the buffer (computed in u128, so no overflow here);
//! - outputs (`TensorMut`): the same, and two indices sharing an element (decided by
//!   brute force) must be refused, while nested layouts (each stride, sorted, beyond the
//!   span of the smaller ones: every dense or padded layout) must be accepted.
//!
//! Accepted views report back the shape and strides they were built with.
#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use flashcpu::{Bias, Tensor, TensorMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = one(&mut Unstructured::new(data));
});

fn dim(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0..=9)? {
        0 => usize::arbitrary(u)?,
        1 => *u.choose(&[usize::MAX, usize::MAX / 2 + 1, 1 << 32, 1 << 63])?,
        _ => u.int_in_range(0..=12)?,
    })
}

fn stride(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0..=9)? {
        0 => usize::arbitrary(u)?,
        1 => *u.choose(&[usize::MAX, usize::MAX / 2 + 1, 1 << 32, 1 << 63])?,
        2 => 0,
        3 => 1,
        _ => u.int_in_range(0..=200)?,
    })
}

fn extent(shape: &[usize; 4], strides: &[usize; 4]) -> u128 {
    if shape.contains(&0) {
        return 0;
    }
    // Each term is below 2^128; saturate the sum (anything that large fits no buffer).
    shape
        .iter()
        .zip(strides)
        .map(|(&n, &s)| (n as u128 - 1) * s as u128)
        .fold(1u128, u128::saturating_add)
}

fn overlaps(shape: &[usize; 4], strides: &[usize; 4]) -> bool {
    if shape.contains(&0) {
        return false;
    }
    let ext = extent(shape, strides) as usize; // fits: only called on in-bounds views
    let count = shape
        .iter()
        .try_fold(1u128, |acc, &n| acc.checked_mul(n as u128));
    if count.is_none_or(|c| c > ext as u128) {
        return true; // pigeonhole
    }
    let mut seen = vec![false; ext];
    for a in 0..shape[0] {
        for b in 0..shape[1] {
            for c in 0..shape[2] {
                for d in 0..shape[3] {
                    let off = a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3];
                    if std::mem::replace(&mut seen[off], true) {
                        return true;
                    }
                }
            }
        }
    }
    false
}

fn nested(shape: &[usize; 4], strides: &[usize; 4]) -> bool {
    let mut dims: Vec<(u128, u128)> = (0..4)
        .filter(|&i| shape[i] > 1)
        .map(|i| (strides[i] as u128, shape[i] as u128))
        .collect();
    dims.sort_unstable();
    let mut span = 0u128;
    for (s, n) in dims {
        if s <= span {
            return false;
        }
        span = span.saturating_add((n - 1) * s);
    }
    true
}

/// The saturating product the dense constructors document.
fn sat(xs: &[usize]) -> usize {
    xs.iter().fold(1usize, |a, &x| a.saturating_mul(x))
}

fn one(u: &mut Unstructured) -> Result<()> {
    let len = u.int_in_range(0..=4096)?;
    let mut shape = [0usize; 4];
    let mut strides = [0usize; 4];
    for i in 0..4 {
        shape[i] = dim(u)?;
        strides[i] = stride(u)?;
    }
    if u.ratio(3u8, 4)? {
        strides[3] = 1;
    }
    let fits = extent(&shape, &strides) <= len as u128;
    let input_ok = strides[3] == 1 && fits;

    let buf = vec![0.0f32; len];
    match Tensor::from_strides(&buf, shape, strides) {
        Ok(t) => {
            assert!(input_ok, "Tensor accepted {shape:?} {strides:?} over {len}");
            assert_eq!((t.shape(), t.strides()), (shape, strides));
        }
        Err(e) => assert!(
            !input_ok,
            "Tensor refused {shape:?} {strides:?} over {len}: {e}"
        ),
    }
    match Bias::from_strides(&buf, shape, strides) {
        Ok(b) => {
            assert!(input_ok, "Bias accepted {shape:?} {strides:?} over {len}");
            assert_eq!(b.shape(), shape);
        }
        Err(e) => assert!(
            !input_ok,
            "Bias refused {shape:?} {strides:?} over {len}: {e}"
        ),
    }
    let mut out = vec![0.0f32; len];
    match TensorMut::from_strides(&mut out, shape, strides) {
        Ok(t) => {
            assert!(
                input_ok,
                "TensorMut accepted {shape:?} {strides:?} over {len}"
            );
            assert!(
                !overlaps(&shape, &strides),
                "TensorMut accepted overlapping {shape:?} {strides:?}"
            );
            assert_eq!((t.shape(), t.strides()), (shape, strides));
        }
        Err(e) => assert!(
            !input_ok || (overlaps(&shape, &strides) || !nested(&shape, &strides)),
            "TensorMut refused {shape:?} {strides:?} over {len}: {e}"
        ),
    }

    // The dense constructors: their strides are implied (saturating), the oracle the same.
    let [b, s, h, d] = shape;
    let bshd = [sat(&[s, h, d]), sat(&[h, d]), d, 1];
    let ok = extent(&shape, &bshd) <= len as u128;
    assert_eq!(
        Tensor::bshd(&buf, shape).is_ok(),
        ok,
        "bshd {shape:?} over {len}"
    );
    let dense_mut = ok && !overlaps(&shape, &bshd);
    let r = TensorMut::bshd(&mut out, shape);
    if dense_mut {
        assert!(
            r.is_ok(),
            "TensorMut::bshd {shape:?} over {len}: {:?}",
            r.err()
        );
    } else if r.is_ok() {
        assert!(
            ok && !overlaps(&shape, &bshd),
            "TensorMut::bshd accepted {shape:?} over {len}"
        );
    }
    // bhsd: shape given as [b, h, s, d].
    let bhsd_strides = [sat(&[h, s, d]), d, sat(&[s, d]), 1];
    let logical = [b, s, h, d];
    let ok = extent(&logical, &bhsd_strides) <= len as u128;
    match Tensor::bhsd(&buf, [b, h, s, d]) {
        Ok(t) => {
            assert!(ok, "bhsd accepted {shape:?} over {len}");
            assert_eq!(t.shape(), logical);
        }
        Err(e) => assert!(!ok, "bhsd refused {shape:?} over {len}: {e}"),
    }
    let _ = Bias::new(&buf, shape);
    Ok(())
}
