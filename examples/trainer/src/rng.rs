//! Counter-based randomness: every draw is a pure function of `(seed, stream, i, j)`.
//!
//! A resumed run therefore needs no generator state in its checkpoint: the mini-batch
//! of step `s` is the same whether the process started at step 0 or at step `s`.

/// Independent streams of draws, so that e.g. weight initialisation and batch
/// selection never reuse the same numbers.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Init = 1,
    Batch = 2,
    Generate = 3,
}

/// splitmix64's output function: a bijective mixer with good avalanche.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `j`-th draw of item `i` in `stream` under `seed`.
pub fn draw(seed: u64, stream: Stream, i: u64, j: u64) -> u64 {
    let h = splitmix64(seed);
    let h = splitmix64(h ^ stream as u64);
    let h = splitmix64(h ^ i);
    splitmix64(h ^ j)
}

/// A uniform float in `[0, 1)` from the top 53 bits of `r`.
pub fn unit(r: u64) -> f64 {
    (r >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform integer in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for
/// any data set this trainer can hold).
pub fn below(r: u64, n: usize) -> usize {
    ((u128::from(r) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_pure_and_streams_differ() {
        assert_eq!(draw(7, Stream::Batch, 3, 4), draw(7, Stream::Batch, 3, 4));
        assert_ne!(draw(7, Stream::Batch, 3, 4), draw(7, Stream::Init, 3, 4));
        assert_ne!(draw(7, Stream::Batch, 3, 4), draw(8, Stream::Batch, 3, 4));
        assert_ne!(draw(7, Stream::Batch, 3, 4), draw(7, Stream::Batch, 4, 3));
    }

    #[test]
    fn ranges() {
        assert!((0..1000).all(|i| (0.0..1.0).contains(&unit(splitmix64(i)))));
        assert!(unit(u64::MAX) < 1.0);
        assert!((0..1000).all(|i| below(splitmix64(i), 10) < 10));
        assert_eq!(below(u64::MAX, 10), 9);
    }
}
