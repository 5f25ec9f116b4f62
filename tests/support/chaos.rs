//! What every chaos suite shares: a reproducible choice of moments and shapes, and how many
//! kills to run (`DISCUS_CHAOS_KILLS`) from which seed (`DISCUS_CHAOS_SEED`, to replay a run).

/// xorshift64*: reproducible from its seed, and enough for choosing moments and shapes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The number of kills (`default` unless `DISCUS_CHAOS_KILLS` says) and the generator, seeded
/// from `DISCUS_CHAOS_SEED` or a fixed seed; both printed, so that a run can be replayed.
pub fn plan(suite: &str, default: u64) -> (u64, Rng) {
    let kills: u64 = std::env::var("DISCUS_CHAOS_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(default);
    let seed: u64 = std::env::var("DISCUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d15c);
    println!("{suite} chaos: {kills} kills, DISCUS_CHAOS_SEED={seed}");
    (kills, Rng(seed.max(1)))
}
