use flashcpu::*;
fn main() {
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    for &(b, sq, skv, hq, hkv, dk, dv, causal) in &[
        (1, 1, 1, 1, 1, 1, 1, false),
        (2, 37, 53, 8, 2, 17, 33, true),
        (1, 130, 70, 4, 4, 128, 128, true),
        (1, 1, 300, 32, 8, 128, 128, false),
        (1, 5, 3, 2, 1, 3, 5, true),
        (1, 1, 2000, 8, 2, 64, 64, false),
        (2, 3, 1500, 4, 4, 32, 48, true),
    ] {
        let q: Vec<f32> = (0..b * sq * hq * dk).map(|_| rnd()).collect();
        let k: Vec<f32> = (0..b * skv * hkv * dk).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..b * skv * hkv * dv).map(|_| rnd()).collect();
        let slopes: Vec<f32> = (0..hq).map(|h| 0.1 * h as f32).collect();
        let sinks: Vec<f32> = (0..hq).map(|h| h as f32 * 0.3).collect();
        for variant in 0..4 {
            let mut a = Attention::new();
            if causal {
                a = a.causal();
            }
            if variant == 1 {
                a = a.softcap(3.0).window(7, 2);
            }
            if variant == 2 {
                a = a.alibi(&slopes).sinks(&sinks);
            }
            if variant == 3 {
                a = a.scale(3.0);
            }
            let qt = Tensor::bshd(&q, [b, sq, hq, dk]).unwrap();
            let kt = Tensor::bshd(&k, [b, skv, hkv, dk]).unwrap();
            let vt = Tensor::bshd(&v, [b, skv, hkv, dv]).unwrap();
            let r = reference::attention(&a, qt, kt, vt).unwrap();
            for be in Backend::available() {
                let mut o = vec![f32::NAN; b * sq * hq * dv];
                let mut lse = vec![0.0; b * hq * sq];
                a.backend(be)
                    .forward_with_lse(
                        qt,
                        kt,
                        vt,
                        &mut TensorMut::bshd(&mut o, [b, sq, hq, dv]).unwrap(),
                        &mut lse,
                    )
                    .unwrap();
                let err = o
                    .iter()
                    .zip(&r.out)
                    .map(|(x, y)| (*x as f64 - y).abs())
                    .fold(0.0, f64::max);
                let lerr = lse
                    .iter()
                    .zip(&r.lse)
                    .map(|(x, y)| {
                        if *y == f64::NEG_INFINITY {
                            if *x == f32::NEG_INFINITY { 0.0 } else { 1.0 }
                        } else {
                            (*x as f64 - y).abs()
                        }
                    })
                    .fold(0.0, f64::max);
                println!(
                    "{be:7} {:?} v{variant} err {err:.2e} lse {lerr:.2e}",
                    (b, sq, skv, hq, hkv, dk, dv, causal)
                );
            }
        }
    }
}
