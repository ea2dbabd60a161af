//! Views over caller memory: [`Tensor`], [`TensorMut`] and [`Bias`].
//!
//! A view is a slice plus a logical shape `[batch, seq, heads, dim]` and element strides.
//! The head-dim stride is always 1; every other stride is free, so BSHD (FlashAttention,
//! candle), BHSD (PyTorch) and padded or sliced layouts all work without copies.
//! Construction checks that every element the shape can address lies inside the slice,
//! and, for outputs, that no two elements share a memory location.

use crate::error::{Error, Result};

/// Highest offset the view can touch plus one, or `None` for an empty view.
fn extent(arg: &'static str, shape: &[usize], strides: &[usize]) -> Result<Option<usize>> {
    if shape.contains(&0) {
        return Ok(None);
    }
    let mut last = 0usize;
    for (&n, &s) in shape.iter().zip(strides) {
        let step = (n - 1)
            .checked_mul(s)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(|| {
                Error::stride(
                    arg,
                    format!("offsets overflow usize (shape {shape:?}, strides {strides:?})"),
                )
            })?;
        last = step;
    }
    let end = last.checked_add(1).ok_or_else(|| {
        Error::stride(
            arg,
            format!("offsets overflow usize (shape {shape:?}, strides {strides:?})"),
        )
    })?;
    Ok(Some(end))
}

fn check_fits(arg: &'static str, len: usize, shape: &[usize], strides: &[usize]) -> Result<()> {
    if let Some(need) = extent(arg, shape, strides)?
        && need > len
    {
        return Err(Error::stride(
            arg,
            format!(
                "shape {shape:?} with strides {strides:?} reaches element {} but the buffer holds {len}",
                need - 1
            ),
        ));
    }
    Ok(())
}

/// Rejects strides under which two in-bounds indices map to the same element.
///
/// Sorting the dimensions by stride, each stride must exceed the span of all the smaller
/// ones: a sufficient condition that accepts every dense or padded layout.
fn check_no_overlap(arg: &'static str, shape: &[usize], strides: &[usize]) -> Result<()> {
    if shape.contains(&0) {
        return Ok(());
    }
    let mut dims: Vec<(usize, usize)> = shape
        .iter()
        .zip(strides)
        .filter(|(n, _)| **n > 1)
        .map(|(&n, &s)| (s, n))
        .collect();
    dims.sort_unstable();
    let mut span = 0usize; // highest offset reachable with the dims seen so far
    for (s, n) in dims {
        if s <= span {
            return Err(Error::stride(
                arg,
                format!("output strides {strides:?} with shape {shape:?} make elements overlap"),
            ));
        }
        span += (n - 1) * s; // cannot overflow: `extent` succeeded first
    }
    Ok(())
}

/// A read-only 4-D view `[batch, seq, heads, dim]` over a slice (Q, K or V).
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) shape: [usize; 4],
    /// Element strides of batch, seq and heads; the dim stride is 1.
    pub(crate) strides: [usize; 3],
}

impl<'a, T> Tensor<'a, T> {
    /// A contiguous `[batch, seq, heads, dim]` tensor (FlashAttention / candle layout).
    pub fn bshd(data: &'a [T], shape: [usize; 4]) -> Result<Self> {
        let [_, s, h, d] = shape;
        let strides = [
            s.saturating_mul(h).saturating_mul(d),
            h.saturating_mul(d),
            d,
        ];
        Self::from_strides(data, shape, [strides[0], strides[1], strides[2], 1])
    }

    /// A contiguous `[batch, heads, seq, dim]` tensor (PyTorch layout); `shape` is given in
    /// that order too.
    pub fn bhsd(data: &'a [T], shape: [usize; 4]) -> Result<Self> {
        let [b, h, s, d] = shape;
        let sb = h.saturating_mul(s).saturating_mul(d);
        Self::from_strides(data, [b, s, h, d], [sb, d, s.saturating_mul(d), 1])
    }

    /// A view with explicit element strides; `shape` and `strides` are in
    /// `[batch, seq, heads, dim]` order and the dim stride must be 1.
    pub fn from_strides(data: &'a [T], shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        Self::new_named("tensor", data, shape, strides)
    }

    pub(crate) fn new_named(
        arg: &'static str,
        data: &'a [T],
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        if strides[3] != 1 {
            return Err(Error::stride(
                arg,
                format!("the head-dim stride must be 1, got {}", strides[3]),
            ));
        }
        check_fits(arg, data.len(), &shape, &strides)?;
        Ok(Tensor {
            data,
            shape,
            strides: [strides[0], strides[1], strides[2]],
        })
    }

    /// The logical shape `[batch, seq, heads, dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The element strides `[batch, seq, heads, dim]`.
    pub fn strides(&self) -> [usize; 4] {
        [self.strides[0], self.strides[1], self.strides[2], 1]
    }

    /// Offset of row `(b, s, h)`; the row is `dim` elements long.
    #[inline(always)]
    pub(crate) fn offset(&self, b: usize, s: usize, h: usize) -> usize {
        b * self.strides[0] + s * self.strides[1] + h * self.strides[2]
    }

    /// Row `(b, s, h)`: `dim` contiguous elements.
    #[inline(always)]
    pub(crate) fn row(&self, b: usize, s: usize, h: usize) -> &'a [T] {
        let o = self.offset(b, s, h);
        &self.data[o..o + self.shape[3]]
    }
}

/// A writable 4-D view `[batch, seq, heads, dim]` over a slice (the output).
///
/// Besides the checks of [`Tensor`], construction rejects strides that make two
/// elements overlap, so every output element is written exactly once.
#[derive(Debug)]
pub struct TensorMut<'a, T> {
    pub(crate) data: &'a mut [T],
    pub(crate) shape: [usize; 4],
    pub(crate) strides: [usize; 3],
}

impl<'a, T> TensorMut<'a, T> {
    /// A contiguous `[batch, seq, heads, dim]` output.
    pub fn bshd(data: &'a mut [T], shape: [usize; 4]) -> Result<Self> {
        let [_, s, h, d] = shape;
        let strides = [
            s.saturating_mul(h).saturating_mul(d),
            h.saturating_mul(d),
            d,
            1,
        ];
        Self::from_strides(data, shape, strides)
    }

    /// A contiguous `[batch, heads, seq, dim]` output; `shape` is given in that order.
    pub fn bhsd(data: &'a mut [T], shape: [usize; 4]) -> Result<Self> {
        let [b, h, s, d] = shape;
        let sb = h.saturating_mul(s).saturating_mul(d);
        Self::from_strides(data, [b, s, h, d], [sb, d, s.saturating_mul(d), 1])
    }

    /// An output with explicit element strides in `[batch, seq, heads, dim]` order; the dim
    /// stride must be 1 and no two elements may overlap.
    pub fn from_strides(data: &'a mut [T], shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        let arg = "o";
        if strides[3] != 1 {
            return Err(Error::stride(
                arg,
                format!("the head-dim stride must be 1, got {}", strides[3]),
            ));
        }
        check_fits(arg, data.len(), &shape, &strides)?;
        check_no_overlap(arg, &shape, &strides)?;
        Ok(TensorMut {
            data,
            shape,
            strides: [strides[0], strides[1], strides[2]],
        })
    }

    /// The logical shape `[batch, seq, heads, dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The element strides `[batch, seq, heads, dim]`.
    pub fn strides(&self) -> [usize; 4] {
        [self.strides[0], self.strides[1], self.strides[2], 1]
    }
}

/// An additive f32 score bias `[batch, heads_q, seq_q, seq_kv]`, broadcast over a batch
/// or head dimension of size 1. Entries may be `-inf` (a mask) but not NaN or `+inf`.
#[derive(Clone, Copy, Debug)]
pub struct Bias<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) shape: [usize; 4],
    /// Strides of batch, heads and seq_q; 0 where the dimension is broadcast.
    pub(crate) strides: [usize; 3],
}

impl<'a> Bias<'a> {
    /// A contiguous `[batch, heads, seq_q, seq_kv]` bias, where batch may be 1 (broadcast
    /// over batches) and heads may be 1 (broadcast over heads).
    pub fn new(data: &'a [f32], shape: [usize; 4]) -> Result<Self> {
        let [_, h, sq, skv] = shape;
        let s2 = skv;
        let s1 = sq.saturating_mul(skv);
        let s0 = h.saturating_mul(s1);
        Self::from_strides(data, shape, [s0, s1, s2, 1])
    }

    /// A bias with explicit strides in `[batch, heads, seq_q, seq_kv]` order; the `seq_kv`
    /// stride must be 1.
    pub fn from_strides(data: &'a [f32], shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        let arg = "bias";
        if strides[3] != 1 {
            return Err(Error::stride(
                arg,
                format!("the seq_kv stride must be 1, got {}", strides[3]),
            ));
        }
        check_fits(arg, data.len(), &shape, &strides)?;
        let mut s = [strides[0], strides[1], strides[2]];
        for (i, st) in s.iter_mut().enumerate().take(2) {
            if shape[i] == 1 {
                *st = 0;
            }
        }
        Ok(Bias {
            data,
            shape,
            strides: s,
        })
    }

    /// The shape `[batch, heads, seq_q, seq_kv]` (batch and heads may be 1).
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Bias row for `(b, h, i)`: `seq_kv` entries.
    #[inline(always)]
    pub(crate) fn row(&self, b: usize, h: usize, i: usize) -> &'a [f32] {
        let o = b * self.strides[0] + h * self.strides[1] + i * self.strides[2];
        &self.data[o..o + self.shape[3]]
    }
}
