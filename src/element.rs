//! Storage element types.
//!
//! Compute is always f32 with f32 accumulation; an [`Element`] only says how rows are
//! converted to f32 when a tile is packed and back when the output is written. Adding a
//! storage type touches this file alone, never the kernel.

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage type for Q, K, V and O: `f32`, [`half::f16`] or [`half::bf16`].
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    /// A short name for messages and benchmarks (`"f32"`, `"f16"`, `"bf16"`).
    const NAME: &'static str;
    /// Converts a row to f32; `src` and `dst` have the same length.
    fn load_row(src: &[Self], dst: &mut [f32]);
    /// Converts a row from f32, rounding to nearest even; `src` and `dst` have the same length.
    fn store_row(src: &[f32], dst: &mut [Self]);
    /// `Some` when the storage already is f32, so kernels may read it in place.
    #[inline(always)]
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    /// `Some` when the storage already is f32, so kernels may write it in place.
    #[inline(always)]
    fn as_f32_mut(_dst: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// Converts one value to f32 (used by the reference, not by the kernels).
    fn to_f32(self) -> f32;
    /// Converts one f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline(always)]
    fn as_f32_mut(dst: &mut [f32]) -> Option<&mut [f32]> {
        Some(dst)
    }
    #[inline(always)]
    fn load_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn store_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

// `half`'s slice conversions detect F16C / NEON fp16 at run time and vectorise.
impl Element for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn load_row(src: &[f16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
    #[inline(always)]
    fn store_row(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn load_row(src: &[bf16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
    #[inline(always)]
    fn store_row(src: &[f32], dst: &mut [bf16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
