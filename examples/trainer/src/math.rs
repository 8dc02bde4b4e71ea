//! `exp` and `tanh` from IEEE-754 basic operations only.
//!
//! `f64::exp` and `f64::tanh` call the platform's libm, whose last bit differs between
//! libm versions. A job that is preempted may resume on another VM image, and the
//! resumed model must still be bit-identical to an uninterrupted run, so the training
//! math avoids libm: `+ - * /`, `round` and exponent-bit arithmetic are exact or
//! correctly rounded everywhere.

/// ln 2 split in two (fdlibm's constants, as bits): LN2_HI has 32 trailing zero bits,
/// so `k * LN2_HI` is exact for every `k` that `exp` uses.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// Above this exp overflows, below the other it underflows to zero.
const EXP_MAX: f64 = 709.782_712_893_384;
const EXP_MIN: f64 = -745.133_219_101_941_2;

/// e^x, within a couple of ulps.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_MAX {
        return f64::INFINITY;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    // x = k ln2 + r with |r| <= ln2/2, so e^x = 2^k e^r.
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor series of e^r in Horner form; the r^14/14! term is below 2^-58.
    let mut p = 1.0;
    for n in (1..=13).rev() {
        p = 1.0 + p * r / f64::from(n);
    }
    scale_by_pow2(p, k as i32)
}

/// x * 2^k, in two exact-or-rounded steps when 2^k itself is not a normal f64.
fn scale_by_pow2(x: f64, k: i32) -> f64 {
    if k > 1023 {
        x * pow2(1023) * pow2(k - 1023)
    } else if k < -1022 {
        x * pow2(-1022) * pow2(k + 1022)
    } else {
        x * pow2(k)
    }
}

/// 2^k for -1022 <= k <= 1023, built from its exponent bits.
fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// tanh(x) = (1 - e^-2|x|) / (1 + e^-2|x|), with the sign of x.
pub fn tanh(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    // Beyond 20, tanh rounds to ±1 in f64.
    if x.abs() > 20.0 {
        return x.signum();
    }
    let e = exp(-2.0 * x.abs());
    let t = (1.0 - e) / (1.0 + e);
    if x < 0.0 { -t } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn exp_matches_libm() {
        let mut x = -745.0;
        while x < 709.0 {
            if x > -708.0 {
                assert!(rel_err(exp(x), x.exp()) < 1e-14, "exp({x})");
            } else {
                // Subnormal results: within a couple of the smallest subnormals.
                assert!((exp(x) - x.exp()).abs() <= 2.0 * 5e-324, "exp({x})");
            }
            x += 0.37;
        }
        for x in [0.0, 1e-300, -1e-300, 1e-9, 0.5, -0.5, 1.0, 700.0] {
            assert!(rel_err(exp(x), x.exp()) < 1e-15, "exp({x})");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(710.0), f64::INFINITY);
        assert_eq!(exp(-746.0), 0.0);
        assert!(exp(f64::NAN).is_nan());
    }

    #[test]
    fn tanh_matches_libm() {
        let mut x = -25.0;
        while x < 25.0 {
            assert!((tanh(x) - x.tanh()).abs() < 1e-15, "tanh({x})");
            x += 0.013;
        }
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-100.0), -1.0);
    }
}
