//! Deterministic mutations of real files, for the bounded robustness and
//! property tests (the coverage-guided fuzzers in fuzz/ run the long ones).

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit of `bytes`: a few bits flipped, a cut, a byte made a
/// digit or separator, or a line dropped or repeated.
pub fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return b;
    }
    match rng.below(4) {
        0 => {
            // flip a few bytes
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(rng.below(b.len())),
        2 => {
            // replace a byte with a digit or separator, the likeliest to parse
            let i = rng.below(b.len());
            b[i] = b"0123456789-. ,[]{}"[rng.below(18)];
        }
        _ => {
            // drop or duplicate a line
            let lines: Vec<&[u8]> = bytes.split(|c| *c == b'\n').collect();
            let k = rng.below(lines.len());
            let mut out = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                if i == k && rng.below(2) == 0 {
                    continue;
                }
                out.extend_from_slice(l);
                out.push(b'\n');
                if i == k {
                    out.extend_from_slice(l);
                    out.push(b'\n');
                }
            }
            b = out;
        }
    }
    b
}
