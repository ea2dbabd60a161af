//! The accuracy contract: on every backend, flashcpu's max abs error against the f64
//! reference is at most twice that of a naive f32 implementation (scores materialised in
//! f32, f32 max/exp/sum, f32 product with V), plus a floor of `1e-5·max|v|`.
//!
//! The test prints the measured errors per case and backend (the README quotes them).

use crate::common;

use common::{BiasSpec, Case, Sinks, max_err, naive_f32, run};

const FLOOR_REL: f64 = 1e-5;

fn cases() -> Vec<(String, Case)> {
    // Under emulation (qemu runs set `PROPTEST_CASES` low) the long rows are shortened:
    // the naive f32 and f64 references are quadratic and slow there.
    let long = if common::proptest_cases(96) < 64 {
        1024
    } else {
        4096
    };
    let mut v: Vec<(String, Case)> = Vec::new();
    let mut c = Case::new(1, 64, 256, 4, 2, 128, 128);
    c.causal = true;
    v.push((String::from("prefill d128 causal"), c));

    let mut c = Case::new(1, 48, 300, 4, 1, 64, 96);
    c.softcap = Some(30.0);
    c.alibi = Some(0.5);
    c.window = Some((100, 0));
    c.sinks = Some(Sinks::Random(2.0));
    c.bias = Some(BiasSpec {
        neg_inf: 0.05,
        ..BiasSpec::default()
    });
    c.causal = true;
    v.push((String::from("all modifiers"), c));

    let mut c = Case::new(1, 32, 512, 4, 2, 64, 64);
    c.scale = Some(1.0);
    c.amp = [40.0, 40.0, 1.0];
    v.push((String::from("logits ~1e4"), c));

    let mut c = Case::new(1, 32, 512, 4, 2, 64, 64);
    c.scale = Some(1.0);
    c.amp = [40.0, 40.0, 1.0];
    c.bias = Some(BiasSpec::default());
    c.causal = true;
    v.push((String::from("logits ~1e4 + bias"), c));

    let mut c = Case::new(1, 4, long, 4, 1, 128, 128);
    v.push((format!("long rows skv {long}"), c.clone()));
    c.causal = true;
    c.sq = 2;
    c.scale = Some(1.0);
    c.amp = [3.0, 3.0, 1.0];
    v.push((format!("long rows skv {long}, scale 1"), c));

    let mut c = Case::new(1, 1, long, 4, 1, 576, 512);
    c.v_alias_k = true;
    c.scale = Some(1.0 / 192f32.sqrt());
    v.push((format!("MLA decode 576/512, skv {long}"), c));

    let mut c = Case::new(2, 40, 200, 4, 2, 64, 64);
    c.tq = common::DType::F16;
    c.tkv = common::DType::F16;
    c.causal = true;
    v.push((String::from("f16 inputs, f32 output"), c));
    v
}

/// Relative lse error `|Δlse| / (1 + |lse|)` over the rows that see a key.
fn lse_err(lse: &[f32], want: &[f64]) -> f64 {
    lse.iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(g, w)| (*g as f64 - w).abs() / (1.0 + w.abs()))
        .fold(0.0f64, f64::max)
}

/// The output contract, and the same for the LSE (its error is what merging partial
/// results sees) with a floor of 1e-6 relative.
#[test]
fn accuracy_contract() {
    let mut failures = Vec::new();
    let mut worst: Vec<(flashcpu::Backend, f64, f64)> = common::backends()
        .into_iter()
        .map(|b| (b, 0.0, 0.0))
        .collect();
    eprintln!(
        "{:<32} {:>10} {:>10} | max |Δo| per backend",
        "case", "naive f32", "floor"
    );
    for (name, c) in cases() {
        let data = c.data();
        let want = data.reference(&c);
        let (naive, naive_lse) = naive_f32(&c, &data);
        let naive: Vec<f64> = naive.iter().map(|&x| x as f64).collect();
        let naive_err = max_err(&c, &naive, &want);
        let naive_lse_err = lse_err(&naive_lse, &want.lse);
        let vmax = data
            .dense(&c)
            .2
            .iter()
            .fold(0.0f64, |m, x| m.max(x.abs() as f64));
        let floor = FLOOR_REL * vmax;
        let bound = 2.0 * naive_err + floor;
        let mut line = format!("{name:<32} {naive_err:>10.2e} {floor:>10.2e} |");
        for (be, worst_out, worst_lse) in worst.iter_mut() {
            let got = run(&c, &data, *be).unwrap_or_else(|e| panic!("{be}: {e}"));
            let err = max_err(&c, &got.out, &want);
            let lerr = lse_err(got.lse.as_deref().unwrap(), &want.lse);
            *worst_out = worst_out.max(err / vmax);
            *worst_lse = worst_lse.max(lerr);
            line += &format!(" {}: {err:.2e}", be.name());
            if err > bound {
                failures.push(format!(
                    "{be} on {name:?}: error {err:e} > 2 × naive {naive_err:e} + floor {floor:e}"
                ));
            }
            if lerr > 2.0 * naive_lse_err + 1e-6 {
                failures.push(format!(
                    "{be} on {name:?}: relative lse error {lerr:e} > 2 × naive {naive_lse_err:e} + 1e-6"
                ));
            }
        }
        eprintln!("{line} (lse: naive {naive_lse_err:.1e})");
    }
    for (be, out, lse) in &worst {
        eprintln!(
            "worst on {}: |Δo| / max|v| {out:.2e}, |Δlse| / (1 + |lse|) {lse:.2e}",
            be.name()
        );
    }
    assert!(
        failures.is_empty(),
        "accuracy contract broken:\n{}",
        failures.join("\n")
    );
}
