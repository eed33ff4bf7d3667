//! Beam search as Hugging Face `generate(num_beams=n)` runs it: each step extends every live
//! beam by its 2n most likely tokens, keeps the n best continuations by summed
//! log-probability, and sets aside a continuation that ends in a stop token as a finished
//! hypothesis scored by its sum divided by its length (length_penalty 1). It stops when n
//! hypotheses are finished and no live beam can beat the worst of them, or at max_tokens.

/// A finished candidate output.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens (without the stop token).
    pub tokens: Vec<u32>,
    /// Summed log-probability over generated length.
    pub score: f64,
    /// Whether a stop token ended it (else max_tokens).
    pub stopped: bool,
}

/// The next step of one beam search.
#[derive(Debug, PartialEq)]
pub struct BeamStep {
    /// The new live beams: (parent beam, token, summed log-probability).
    pub beams: Vec<(usize, u32, f64)>,
    /// Hypotheses finished this step, as (parent beam, summed log-probability).
    pub finished: Vec<(usize, f64)>,
}

/// log softmax of one row of logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: a running f32 sum over a 49152-token vocabulary drops the smallest
    // terms and reads about 1e-5 low.
    let sum: f64 = logits.iter().map(|l| f64::from((l - max).exp())).sum();
    let log_sum = sum.ln() as f32 + max;
    logits.iter().map(|l| l - log_sum).collect()
}

/// The `k` largest entries of `values` as (index, value), largest first, lower index first
/// on ties.
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|&(_, w)| v <= w) {
            continue;
        }
        let at = best.partition_point(|&(_, w)| w >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// Chooses the continuations of `n` beams from each live beam's log-probabilities `rows`
/// and summed log-probabilities `sums`.
pub fn step(rows: &[Vec<f32>], sums: &[f64], n: usize, stop_ids: &[u32]) -> BeamStep {
    let mut candidates: Vec<(f64, usize, u32)> = Vec::new();
    for (b, row) in rows.iter().enumerate() {
        for (token, lp) in top_k(row, 2 * n) {
            candidates.push((sums[b] + lp as f64, b, token));
        }
    }
    candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let mut out = BeamStep {
        beams: Vec::with_capacity(n),
        finished: Vec::new(),
    };
    for (rank, (score, b, token)) in candidates.into_iter().enumerate() {
        if stop_ids.contains(&token) {
            // As HF: only a stop among the n best candidates finishes a hypothesis.
            if rank < n {
                out.finished.push((b, score));
            }
        } else {
            out.beams.push((b, token, score));
            if out.beams.len() == n {
                break;
            }
        }
    }
    out
}

/// Whether the search is over: `n` hypotheses finished and the best live beam, at `len`
/// generated tokens, cannot beat the worst of the n best.
pub fn is_done(finished: &[Hypothesis], best_live_sum: f64, len: usize, n: usize) -> bool {
    if finished.len() < n {
        return false;
    }
    let mut scores: Vec<f64> = finished.iter().map(|h| h.score).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    best_live_sum / len.max(1) as f64 <= scores[n - 1]
}

/// The best hypothesis.
pub fn best(finished: &[Hypothesis]) -> Option<&Hypothesis> {
    finished.iter().max_by(|a, b| a.score.total_cmp(&b.score))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        assert_eq!(
            top_k(&[0.1, 0.5, 0.3, 0.5, -1.0], 3),
            vec![(1, 0.5), (3, 0.5), (2, 0.3)]
        );
        assert_eq!(top_k(&[1.0], 4), vec![(0, 1.0)]);
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn the_best_continuations_win_across_beams() {
        // Beam 0 (sum -1) prefers token 5 at -0.1; beam 1 (sum -0.5) spreads its mass.
        let row0 = vec![-9.0, -9.0, -9.0, -9.0, -9.0, -0.1];
        let row1 = vec![-0.7, -0.8, -9.0, -9.0, -9.0, -9.0];
        let s = step(&[row0, row1], &[-1.0, -0.5], 2, &[]);
        assert_eq!(s.beams.len(), 2);
        assert_eq!((s.beams[0].0, s.beams[0].1), (0, 5)); // -1.1
        assert_eq!((s.beams[1].0, s.beams[1].1), (1, 0)); // -1.2
                                                          // A stop token among the best finishes a hypothesis instead.
        let row = vec![-0.1, -2.0, -3.0];
        let s = step(&[row], &[0.0], 2, &[0]);
        assert_eq!(s.finished.len(), 1);
        assert!(s.finished[0].0 == 0 && (s.finished[0].1 + 0.1).abs() < 1e-6);
        assert_eq!(s.beams.iter().map(|b| b.1).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn search_ends_when_no_live_beam_can_win() {
        let h = |score| Hypothesis {
            tokens: vec![],
            score,
            stopped: true,
        };
        assert!(!is_done(&[h(-1.0)], -10.0, 5, 2));
        assert!(is_done(&[h(-1.0), h(-1.5)], -10.0, 5, 2));
        assert!(!is_done(&[h(-1.0), h(-1.5)], -5.0, 5, 2));
    }
}
