//! Block transposes for packing: 16 rows at a time into 16-float runs.

/// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < rows`, `c < cols`.
///
/// With `avx512` (the caller runs the AVX-512 backend), blocks of 16 rows × 16 columns
/// use AVX-512 shuffles (64 shuffles per 256 floats instead of 256 scalar moves); the
/// rest is scalar. The result is the same bits either way.
pub(crate) fn transpose(
    avx512: bool,
    src: &[f32],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_stride + cols <= src.len());
    assert!((cols - 1) * dst_stride + rows <= dst.len());
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = avx512;
        0
    };
    #[cfg(target_arch = "x86_64")]
    let done = if avx512 && rows == 16 && std::arch::is_x86_feature_detected!("avx512f") {
        cols / 16 * 16
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    {
        for c0 in (0..done).step_by(16) {
            // SAFETY: AVX-512F is available (checked); rows 0..16 of columns c0..c0+16
            // of `src` and columns c0..c0+16 (16 floats each) of `dst` are in bounds
            // (asserted above: c0 + 16 <= cols).
            unsafe {
                avx512::block16(
                    src.as_ptr().add(c0),
                    src_stride,
                    dst.as_mut_ptr().add(c0 * dst_stride),
                    dst_stride,
                )
            };
        }
    }
    for c in done..cols {
        let run = &mut dst[c * dst_stride..][..rows];
        for (r, x) in run.iter_mut().enumerate() {
            *x = src[r * src_stride + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    /// Transposes the 16 × 16 block at `src` (rows `ss` floats apart) into `dst`
    /// (columns `ds` floats apart, 16 floats each).
    ///
    /// # Safety
    /// AVX-512F is available; `src` is valid for reads of 16 floats at each of
    /// `r * ss` (`r < 16`), `dst` for writes of 16 floats at each of `c * ds` (`c < 16`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block16(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        // SAFETY: the caller's contract covers every load and store below.
        unsafe {
            let r: [__m512; 16] = core::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ss)));
            // Pairs of rows interleaved by float, then by pairs of floats: in each
            // 128-bit lane k, u[4i + j] holds column 4k + j of rows 4i..4i + 4.
            let mut t = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            let mut u = [_mm512_setzero_ps(); 16];
            for i in 0..4 {
                let (a, b) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2]));
                let (c, d) = (
                    _mm512_castps_pd(t[4 * i + 1]),
                    _mm512_castps_pd(t[4 * i + 3]),
                );
                u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
            }
            // Gather the 128-bit lanes: v[j] (j < 4) holds lanes 0 and 2 of rows 0..8
            // for column j (lane 0) and 8 + j (lane 2); v[4 + j] lanes 1 and 3.
            let mut v = [_mm512_setzero_ps(); 16];
            for j in 0..4 {
                v[j] = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
                v[4 + j] = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
                v[8 + j] = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
                v[12 + j] = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
            }
            for j in 0..8 {
                let lo = _mm512_shuffle_f32x4::<0x88>(v[j], v[8 + j]);
                let hi = _mm512_shuffle_f32x4::<0xdd>(v[j], v[8 + j]);
                let (cl, ch) = COLS[j];
                _mm512_storeu_ps(dst.add(cl * ds), lo);
                _mm512_storeu_ps(dst.add(ch * ds), hi);
            }
        }
    }

    /// The columns that the final shuffles of `v[j]` and `v[8 + j]` hold.
    const COLS: [(usize, usize); 8] = [
        (0, 8),
        (1, 9),
        (2, 10),
        (3, 11),
        (4, 12),
        (5, 13),
        (6, 14),
        (7, 15),
    ];
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn matches_the_scalar_transpose() {
        for &(rows, cols, ss, ds) in &[
            (16usize, 16usize, 16usize, 16usize),
            (16, 128, 128, 192),
            (16, 40, 41, 20),
            (7, 33, 33, 9),
            (1, 5, 5, 1),
            (16, 15, 15, 16),
        ] {
            let src: Vec<f32> = (0..rows * ss).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut dst = vec![f32::NAN; cols * ds];
            for fast in [false, true] {
                dst.fill(f32::NAN);
                transpose(fast, &src, ss, rows, cols, &mut dst, ds);
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(dst[c * ds + r], src[r * ss + c], "{rows}x{cols} r{r} c{c}");
                    }
                }
            }
        }
    }
}
