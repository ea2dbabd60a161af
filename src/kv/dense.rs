//! Dense strided K/V tensors (BSHD, BHSD or any strides; V may alias K).

use super::KvSource;
use crate::element::Element;
use crate::tensor::Tensor;

/// K and V as strided views; V may be the first `d_v` columns of K's buffer.
pub(crate) struct DenseKv<'a, T> {
    pub k: Tensor<'a, T>,
    pub v: Tensor<'a, T>,
}

impl<T: Element> KvSource for DenseKv<'_, T> {
    #[inline]
    fn pack_k(&self, b: usize, g: usize, j0: usize, n: usize, dst: &mut [f32], stride: usize) {
        pack(&self.k, b, g, j0, n, dst, stride)
    }

    #[inline]
    fn k_in_place(&self, b: usize, g: usize, j0: usize) -> Option<(&[f32], usize)> {
        rows_in_place(&self.k, b, g, j0)
    }

    #[inline]
    fn v_in_place(&self, b: usize, g: usize, j0: usize) -> Option<(&[f32], usize)> {
        rows_in_place(&self.v, b, g, j0)
    }

    #[inline]
    fn k_half(&self, b: usize, g: usize, j0: usize) -> Option<(&[u16], usize, bool)> {
        rows_half(&self.k, b, g, j0)
    }

    #[inline]
    fn v_half(&self, b: usize, g: usize, j0: usize) -> Option<(&[u16], usize, bool)> {
        rows_half(&self.v, b, g, j0)
    }

    #[inline]
    fn pack_v(&self, b: usize, g: usize, j0: usize, n: usize, dst: &mut [f32], stride: usize) {
        pack(&self.v, b, g, j0, n, dst, stride)
    }
}

/// Rows `j0..j0 + n` of `(b, g)` as f32 rows of `dst`, `stride` floats apart: one call
/// of the element type's conversion for all of them.
#[inline]
fn pack<T: Element>(
    t: &Tensor<'_, T>,
    b: usize,
    g: usize,
    j0: usize,
    n: usize,
    dst: &mut [f32],
    stride: usize,
) {
    if n > 0 {
        let d = t.shape[3];
        T::load_rows(
            &t.data[t.offset(b, j0, g)..],
            t.strides[1],
            dst,
            stride,
            n,
            d,
        );
    }
}

/// Rows of `(b, g)` from key `j0` on, and their stride, when `t` is f32.
#[inline]
fn rows_in_place<'t, T: Element>(
    t: &Tensor<'t, T>,
    b: usize,
    g: usize,
    j0: usize,
) -> Option<(&'t [f32], usize)> {
    let all = T::as_f32(t.data)?;
    Some((&all[t.offset(b, j0, g)..], t.strides[1]))
}

/// Rows of `(b, g)` from key `j0` on as 16-bit words, their stride and whether they are
/// bf16, when `t` is f16 or bf16.
#[inline]
fn rows_half<'t, T: Element>(
    t: &Tensor<'t, T>,
    b: usize,
    g: usize,
    j0: usize,
) -> Option<(&'t [u16], usize, bool)> {
    let (all, bf) = T::as_half_bits(t.data)?;
    Some((&all[t.offset(b, j0, g)..], t.strides[1], bf))
}
