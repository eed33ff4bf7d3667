//! Choosing the next token from logits: greedy at temperature 0, otherwise temperature,
//! top-k and top-p (nucleus, Holtzman et al. 2019) filtering, then a seeded draw.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose draws depend only on the params (and so the seed).
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Picks the next token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let (candidates, probs) = self.nucleus(logits);
        let mut u: f32 = self.rng.random();
        for (c, p) in candidates.iter().zip(&probs) {
            if u < *p {
                return c.0;
            }
            u -= p;
        }
        candidates[probs.len() - 1].0
    }

    /// The tokens a draw may pick and their probabilities (summing to 1): after top-k, the
    /// most likely ones (highest first, ties by lower id) whose probability reaches top-p.
    /// Only the head that holds the nucleus is sorted, not the whole vocabulary: a full sort
    /// of 49,152 logits per row was most of a sampled decode step.
    fn nucleus(&self, logits: &[f32]) -> (Vec<(u32, f32)>, Vec<f32>) {
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // The row's maximum comes off before the division: at tiny temperatures l / T
        // overflows to infinity for every positive logit (inf - inf is NaN), while
        // (l - max) / T only runs to minus infinity, whose probability is 0.
        let row_max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (l - row_max) / self.params.temperature))
            .collect();
        let top_k = self.params.top_k;
        if top_k > 0 && top_k < candidates.len() {
            candidates.select_nth_unstable_by(top_k - 1, order);
            candidates.truncate(top_k);
        }
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = candidates.iter().map(|c| (c.1 - max).exp()).sum();
        let prob = |c: &(u32, f32)| (c.1 - max).exp() / total;
        if self.params.top_p >= 1.0 {
            let probs = candidates.iter().map(prob).collect();
            return (candidates, probs);
        }
        // Sort a head four times larger until its mass reaches top-p.
        let mut head = candidates.len().min(64);
        loop {
            if head < candidates.len() {
                candidates.select_nth_unstable_by(head - 1, order);
            }
            candidates[..head].sort_unstable_by(order);
            let mass: f32 = candidates[..head].iter().map(prob).sum();
            if head == candidates.len() || mass >= self.params.top_p {
                break;
            }
            head = (head * 4).min(candidates.len());
        }
        let mut cumulative = 0.0;
        let keep = candidates[..head]
            .iter()
            .position(|c| {
                cumulative += prob(c);
                cumulative >= self.params.top_p
            })
            .map_or(head, |i| i + 1);
        candidates.truncate(keep);
        let mut probs: Vec<f32> = candidates.iter().map(prob).collect();
        let kept: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
        (candidates, probs)
    }
}

/// Index of the largest value; the first one on ties (as numpy's argmax), NaNs passed
/// over. The maximum comes from sixteen running lanes, which vectorize (a scan comparing
/// each value with the best so far waits on every comparison: 16 greedy rows of 49,152
/// logits were 2% of a decode step), then one pass finds where it first is.
pub fn argmax(values: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(*v);
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    values.iter().position(|&v| v == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_temperatures_pick_the_most_likely_token() {
        // Regression: at 1e-39 the scaled logits overflowed and every draw was garbage.
        let logits = [1.0, 3.0, 2.5, -4.0, f32::NEG_INFINITY];
        for temperature in [1e-39, 1e-37, 1e-20] {
            for seed in 0..20 {
                let mut s = Sampler::new(SamplingParams {
                    temperature,
                    top_k: 0,
                    top_p: 1.0,
                    seed,
                });
                assert_eq!(
                    s.sample(&logits),
                    1,
                    "temperature {temperature}, seed {seed}"
                );
            }
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0]), 1);
        // Past the sixteen lanes, in the tail, among NaNs, and where all are equal.
        let mut long: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        long[40] = 9.0;
        long[90] = 9.0;
        assert_eq!(argmax(&long), 40);
        long[98] = 10.0;
        long[3] = f32::NAN;
        assert_eq!(argmax(&long), 98);
        assert_eq!(argmax(&[f32::NAN, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[2.0; 33]), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits = [0.5, 2.0, 1.9, -1.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&logits), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |p| {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(params), draw(params));
    }

    #[test]
    fn the_nucleus_is_the_head_of_the_fully_sorted_vocabulary() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let logits: Vec<f32> = (0..3000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 10_000) as f32 / 2_000.0
            })
            .collect();
        for (top_k, top_p) in [(0, 0.5), (0, 0.95), (40, 0.9), (0, 0.01), (500, 1.0)] {
            let params = SamplingParams {
                temperature: 0.8,
                top_k,
                top_p,
                seed: 0,
            };
            let mut sorted: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / 0.8))
                .collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if top_k > 0 {
                sorted.truncate(top_k);
            }
            let weights: Vec<f64> = sorted
                .iter()
                .map(|c| ((c.1 - sorted[0].1) as f64).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut cumulative = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    cumulative += w / total;
                    cumulative >= top_p as f64
                })
                .filter(|_| top_p < 1.0)
                .map_or(sorted.len(), |i| i + 1);
            let (got, probs) = Sampler::new(params).nucleus(&logits);
            let mut ids: Vec<u32> = got.iter().map(|c| c.0).collect();
            let mut want: Vec<u32> = sorted[..keep].iter().map(|c| c.0).collect();
            ids.sort_unstable();
            want.sort_unstable();
            assert_eq!(ids, want, "top_k {top_k}, top_p {top_p}");
            assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn top_p_drops_the_tail() {
        // Probabilities ~[0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two only.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
    }
}
