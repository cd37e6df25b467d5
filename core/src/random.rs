//! The runtime's source of randomness (backoff jitter), injected so that a simulation can
//! seed it and replay a run exactly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A shared random number generator. Cloning shares it: every part of one runtime draws from
/// one sequence, so a seeded runtime on a single-threaded executor draws the same numbers in
/// every run.
#[derive(Clone, Debug)]
pub struct Random(Arc<Mutex<StdRng>>);

impl Random {
    /// Seeded from the operating system (the default).
    pub fn from_entropy() -> Self {
        Self(Arc::new(Mutex::new(StdRng::from_entropy())))
    }

    /// Seeded: the same seed gives the same sequence.
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))))
    }

    /// A number in `[0, 1)`.
    pub fn fraction(&self) -> f64 {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .gen::<f64>()
    }

    /// Full jitter: a wait uniformly in `[0, cap)`.
    pub fn full_jitter(&self, cap: Duration) -> Duration {
        cap.mul_f64(self.fraction())
    }

    /// Equal jitter: a wait uniformly in `[cap / 2, cap)`.
    pub fn equal_jitter(&self, cap: Duration) -> Duration {
        cap.mul_f64(0.5 + self.fraction() / 2.0)
    }
}

impl Default for Random {
    fn default() -> Self {
        Self::from_entropy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_sequence() {
        let (a, b) = (Random::seeded(7), Random::seeded(7));
        let cap = Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(a.full_jitter(cap), b.full_jitter(cap));
        }
        let w = a.equal_jitter(cap);
        assert!(w >= cap / 2 && w < cap);
    }
}
