//! What the randomised tests of hostile input share: a seeded generator and a loop that names
//! the seed of a case that panics. Each test module adds the generators of its own inputs as
//! methods of [`Gen`].

/// xorshift64*: deterministic, good enough to spread inputs.
pub(crate) struct Gen(pub(crate) u64);

impl Gen {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs `check` on `cases` generators seeded from `base` and `name`, naming the seed of a
/// case that panics (replay it with `Gen(seed)`).
pub(crate) fn each_case(
    name: &str,
    cases: usize,
    base: u64,
    check: impl Fn(&mut Gen) + std::panic::RefUnwindSafe,
) {
    for case in 0..cases {
        let seed = base + case as u64 * 7919 + name.len() as u64;
        let result = std::panic::catch_unwind(|| check(&mut Gen(seed)));
        assert!(result.is_ok(), "{name}: case with seed {seed:#x} panicked");
    }
}
