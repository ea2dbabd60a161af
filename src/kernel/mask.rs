//! Masks as loop bounds: each row sees one contiguous key range, and each K/V tile is
//! classified as empty (skipped), full (no per-element work) or partial.

/// How a K/V tile relates to the rows of a Q tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileClass {
    /// No row sees any key of the tile: skip it.
    Empty,
    /// Every row sees every key: no per-element masking.
    Full,
    /// Some rows see some keys: mask element-wise.
    Partial,
}

/// Causal and sliding-window masks in positions (`pos = i + skv - sq`, bottom-right
/// aligned), valid for any `sq`, `skv`, including `skv < sq` where `pos` is negative.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileMask {
    causal: bool,
    /// Window `(left, right)`, saturated to `i64::MAX` for unbounded sides.
    window: Option<(i64, i64)>,
    skv: i64,
    offset: i64,
}

impl TileMask {
    pub(crate) fn new(causal: bool, window: Option<(usize, usize)>, sq: usize, skv: usize) -> Self {
        let sat = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        TileMask {
            causal,
            window: window.map(|(l, r)| (sat(l), sat(r))),
            skv: sat(skv),
            offset: sat(skv) - sat(sq),
        }
    }

    /// Position of query `i`.
    #[inline(always)]
    pub(crate) fn pos(&self, i: usize) -> i64 {
        i as i64 + self.offset
    }

    /// The keys `[lo, hi)` visible from position `pos`, clipped to `[0, skv)`; `lo >= hi`
    /// when none is. Both ends are non-decreasing in `pos`.
    #[inline(always)]
    pub(crate) fn key_range(&self, pos: i64) -> (i64, i64) {
        let mut lo = 0i64;
        let mut hi = self.skv; // exclusive
        if self.causal {
            hi = hi.min(pos.saturating_add(1));
        }
        if let Some((left, right)) = self.window {
            lo = lo.max(pos.saturating_sub(left));
            hi = hi.min(pos.saturating_add(right).saturating_add(1));
        }
        (lo, hi.max(lo))
    }

    /// Classifies keys `[j0, j1)` for the rows at positions `pmin..=pmax` (all present).
    #[inline(always)]
    pub(crate) fn classify(&self, pmin: i64, pmax: i64, j0: i64, j1: i64) -> TileClass {
        let (lo_min, hi_min) = self.key_range(pmin);
        let (lo_max, hi_max) = self.key_range(pmax);
        if hi_max <= j0 || lo_min >= j1 {
            return TileClass::Empty;
        }
        // Ranges are monotone in pos: the tightest lower bound comes from pmax and the
        // tightest upper bound from pmin. An empty row range fails this test too.
        if lo_max <= j0 && hi_min >= j1 && lo_min < hi_min {
            TileClass::Full
        } else {
            TileClass::Partial
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(m: &TileMask, pos: i64, j: i64) -> bool {
        let (lo, hi) = m.key_range(pos);
        lo <= j && j < hi
    }

    #[test]
    fn classification_matches_brute_force() {
        for &causal in &[false, true] {
            for &window in &[
                None,
                Some((0, 0)),
                Some((3, 1)),
                Some((usize::MAX, 2)),
                Some((5, usize::MAX)),
            ] {
                for &(sq, skv) in &[(7usize, 13usize), (13, 7), (1, 9), (9, 1)] {
                    let m = TileMask::new(causal, window, sq, skv);
                    for i0 in 0..sq {
                        for i1 in i0..sq {
                            for j0 in 0..skv as i64 {
                                for j1 in j0 + 1..=skv as i64 {
                                    let (pmin, pmax) = (m.pos(i0), m.pos(i1));
                                    let mut any = false;
                                    let mut all = true;
                                    for p in pmin..=pmax {
                                        for j in j0..j1 {
                                            let v = brute(&m, p, j);
                                            any |= v;
                                            all &= v;
                                        }
                                    }
                                    let c = m.classify(pmin, pmax, j0, j1);
                                    match c {
                                        TileClass::Empty => assert!(!any),
                                        TileClass::Full => assert!(all),
                                        TileClass::Partial => {}
                                    }
                                    if all {
                                        assert_eq!(
                                            c,
                                            TileClass::Full,
                                            "{causal} {window:?} {sq} {skv}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
