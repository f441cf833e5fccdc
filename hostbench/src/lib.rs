//! The host benchmark's kernels: fixed units of single-core integer and floating-point work, pure
//! (the client times them). A crate of their own so that the workspace can build them, and sha2,
//! optimised even in debug builds: the score must measure the machine, not the build profile.

use sha2::Digest as _;

/// Bytes in the block the integer kernel hashes.
pub const BLOCK: usize = 64 * 1024;
/// Rows and columns of the float kernel's matrices.
pub const N: usize = 64;

/// The integer kernel's state: a block that each hash is chained into.
pub struct Integer {
    block: Vec<u8>,
}

impl Default for Integer {
    fn default() -> Self {
        Integer {
            block: (0..BLOCK).map(|i| (i * 31 % 251) as u8).collect(),
        }
    }
}

impl Integer {
    /// Hashes the block `chunks` times, chaining each digest into it so nothing is optimised
    /// away; returns the bytes hashed.
    pub fn run(&mut self, chunks: u32) -> u64 {
        for _ in 0..chunks {
            let d = sha2::Sha256::digest(&self.block);
            self.block[..32].copy_from_slice(&d);
        }
        u64::from(chunks) * BLOCK as u64
    }

    /// The first bytes of the block (so a caller can keep the work observable).
    pub fn head(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.block[..32]);
        out
    }
}

/// The float kernel's state: c = (c + a·b) scaled, N×N, in f64.
pub struct Float {
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

impl Default for Float {
    fn default() -> Self {
        Float {
            a: (0..N * N).map(|i| ((i % 17) as f64 + 1.0) / 17.0).collect(),
            b: (0..N * N).map(|i| ((i % 13) as f64 + 1.0) / 13.0).collect(),
            c: vec![0.0; N * N],
        }
    }
}

impl Float {
    /// One matrix product accumulated into c; returns the multiply-adds done.
    pub fn run(&mut self) -> u64 {
        for i in 0..N {
            for k in 0..N {
                let aik = self.a[i * N + k];
                let row = &self.b[k * N..(k + 1) * N];
                let out = &mut self.c[i * N..(i + 1) * N];
                for (o, bkj) in out.iter_mut().zip(row) {
                    // The scale keeps values bounded however long it runs.
                    *o = (*o + aik * bkj) * 0.999_999;
                }
            }
        }
        (N * N * N) as u64
    }

    /// A checksum of c (so a caller can keep the work observable).
    pub fn checksum(&self) -> f64 {
        self.c.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_deterministic() {
        let (mut a, mut b) = (Integer::default(), Integer::default());
        assert_eq!(a.run(3), 3 * BLOCK as u64);
        b.run(3);
        assert_eq!(a.head(), b.head());
        let (mut x, mut y) = (Float::default(), Float::default());
        x.run();
        y.run();
        assert_eq!(x.checksum(), y.checksum());
        assert!(x.checksum().is_finite() && x.checksum() > 0.0);
    }
}
