//! The system random number generator, for the daemons that own I/O.
//!
//! Protocol functions never pick their own randomness: they take `&mut impl CryptoRngCore`. Daemons
//! pass a [`SystemRng`]; tests and vector generation pass a seeded or fixed source.

use rand_core::{CryptoRng, RngCore};
use ring::rand::{SecureRandom, SystemRandom};

/// ring's operating-system random generator as a `rand_core` RNG.
#[derive(Debug, Clone)]
pub struct SystemRng(SystemRandom);

impl SystemRng {
    /// Opens the system generator.
    pub fn new() -> Self {
        SystemRng(SystemRandom::new())
    }
}

impl Default for SystemRng {
    fn default() -> Self {
        Self::new()
    }
}

impl RngCore for SystemRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // INVARIANT: on Linux ring reads getrandom(2), which does not fail once the kernel's pool is
        // initialised; continuing without randomness would be worse than stopping.
        #[allow(clippy::expect_used)]
        self.0
            .fill(dest)
            .expect("the operating system's random generator failed");
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.fill(dest).map_err(|_| {
            rand_core::Error::from(
                core::num::NonZeroU32::new(rand_core::Error::CUSTOM_START)
                    .unwrap_or(core::num::NonZeroU32::MIN),
            )
        })
    }
}

impl CryptoRng for SystemRng {}
