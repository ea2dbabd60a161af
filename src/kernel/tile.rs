//! Register-blocked micro-kernels: `S = K̂·Qᵀ` and `O += Pᵀ·V̂`.
//!
//! Both keep an `A×B`-vector accumulator block in registers for the whole reduction and
//! touch memory only through one broadcast per row and one vector load per column
//! vector per step. They read packed, padded, 64-byte-aligned scratch, so no bounds
//! check or tail sits in the inner loop; the driver guarantees the extents.
//!
//! This is the one module with `unsafe`: raw-pointer reads and writes into scratch
//! buffers whose sizes the driver asserts before the loop (bounds checks in these loops
//! cost 18–30 % in the tooling spike).

use pulp::Simd;

/// `st[j][v] = Σ_d k[j][d] · qt[d][v]` for `MK` keys and `NV` vectors of query rows.
///
/// # Safety
/// - `k` is valid for reads of `(MK - 1) * k_stride + d` floats;
/// - `qt` is valid for reads of `(d - 1) * qt_stride + NV` vectors (when `d > 0`);
/// - `st` is valid for writes of `(MK - 1) * st_stride + NV` vectors.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn qk_block<S: Simd, const MK: usize, const NV: usize>(
    simd: S,
    k: *const f32,
    k_stride: usize,
    qt: *const S::f32s,
    qt_stride: usize,
    d: usize,
    st: *mut S::f32s,
    st_stride: usize,
) {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NV]; MK];
    for dd in 0..d {
        let mut q = [zero; NV];
        for (v, qv) in q.iter_mut().enumerate() {
            // SAFETY: dd < d and v < NV, within the caller's `qt` extent.
            *qv = unsafe { qt.add(dd * qt_stride + v).read() };
        }
        for (j, row) in acc.iter_mut().enumerate() {
            // SAFETY: j < MK and dd < d, within the caller's `k` extent.
            let kb = simd.splat_f32s(unsafe { *k.add(j * k_stride + dd) });
            for (a, qv) in row.iter_mut().zip(&q) {
                *a = simd.mul_add_e_f32s(kb, *qv, *a);
            }
        }
    }
    for (j, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: j < MK and v < NV, within the caller's `st` extent.
            unsafe { st.add(j * st_stride + v).write(*a) };
        }
    }
}

/// `o[r][v] += Σ_{j<n} p[j][r] · vv[j][v]` for `MR` rows and `NV` vectors of columns.
///
/// # Safety
/// - `p` is valid for reads of `(n - 1) * p_stride + MR` floats (when `n > 0`);
/// - `vv` is valid for reads of `(n - 1) * v_stride + NV * lanes` floats (when `n > 0`),
///   with no alignment requirement (V may be read in place from the caller's tensor);
/// - `o` is valid for reads and writes of `(MR - 1) * o_stride + NV` vectors.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn pv_block<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    p: *const f32,
    p_stride: usize,
    n: usize,
    vv: *const f32,
    v_stride: usize,
    o: *mut S::f32s,
    o_stride: usize,
) {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NV]; MR];
    for (r, row) in acc.iter_mut().enumerate() {
        for (c, a) in row.iter_mut().enumerate() {
            // SAFETY: r < MR and c < NV, within the caller's `o` extent.
            *a = unsafe { o.add(r * o_stride + c).read() };
        }
    }
    for j in 0..n {
        let mut x = [zero; NV];
        for (c, xv) in x.iter_mut().enumerate() {
            // SAFETY: j < n and c < NV, within the caller's `vv` extent; unaligned read.
            *xv = unsafe {
                (vv.add(j * v_stride + c * S::F32_LANES) as *const S::f32s).read_unaligned()
            };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: j < n and r < MR, within the caller's `p` extent.
            let pb = simd.splat_f32s(unsafe { *p.add(j * p_stride + r) });
            for (a, xv) in row.iter_mut().zip(&x) {
                *a = simd.mul_add_e_f32s(pb, *xv, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate() {
            // SAFETY: r < MR and c < NV, within the caller's `o` extent.
            unsafe { o.add(r * o_stride + c).write(*a) };
        }
    }
}
