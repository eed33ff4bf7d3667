//! The search of a FrugalGPT cascade (Chen, Zaharia and Zou 2023, section 3): given every
//! development example's outcome, cost and score at every stage ([`Table`]), the chain of
//! stages and acceptance thresholds that is most accurate within a budget. A query goes to
//! the chain's first stage; if the scorer trusts its answer (score at or above the stage's
//! threshold) the answer is returned, else the query goes on, and the last stage always
//! answers. Every visited stage is paid for, so a query answered by the third stage costs
//! the first three stages' prices.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// A plan fits the budget if its mean cost is at most `budget + BUDGET_SLACK`, so a budget
/// equal to a plan's cost is not missed by a rounding error.
const BUDGET_SLACK: f64 = 1e-12;
/// Mean costs this close (relative to the larger) count as a tie.
const COST_TIE: f64 = 1e-12;

/// Every dev item's outcome at every stage: right or not, what it cost, the scorer's score.
/// Each field is indexed `[item][stage]`, and all three have the same shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Whether the stage's answer to the item is right.
    pub right: Vec<Vec<bool>>,
    /// What asking the stage about the item costs (any unit; the budget uses the same).
    pub cost: Vec<Vec<f64>>,
    /// The scorer's probability that the stage's answer is right (out of fold, on dev data).
    pub score: Vec<Vec<f64>>,
}

/// A cascade: which stages, in which order, with the score each must reach to answer.
///
/// With non-negative costs [`search`] never returns an infinite threshold (dropping that stage
/// is as accurate and no dearer), so its plans survive JSON, which has no infinity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Stage indices, increasing (cheap to dear, as the table orders them).
    pub chain: Vec<usize>,
    /// `thresholds[l]`: the score stage `chain[l]` must reach to answer; one fewer than the
    /// chain's stages, since the last stage always answers.
    pub thresholds: Vec<f64>,
    /// The fraction of dev items answered right.
    pub accuracy: f64,
    /// The mean cost per dev item.
    pub cost: f64,
}

/// What a cascade does on a [`Table`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The fraction of items answered right.
    pub accuracy: f64,
    /// The mean cost per item, every visited stage paid for.
    pub cost: f64,
    /// How many items each stage of the chain answered.
    pub answered_by: Vec<usize>,
}

/// Runs every item of `table` through the cascade `chain` with `thresholds` (FrugalGPT's
/// accounting): an item visits the chain's stages in order and pays each visited stage's
/// cost; stage `l` below the last answers when the item's score there is at least
/// `thresholds[l]`, and the last stage always answers. An empty table gives accuracy 0 and
/// cost 0.
pub fn simulate(chain: &[usize], thresholds: &[f64], table: &Table) -> Outcome {
    debug_assert!(!chain.is_empty(), "a cascade has at least one stage");
    debug_assert_eq!(
        thresholds.len() + 1,
        chain.len(),
        "one threshold per non-final stage"
    );
    let (n, _) = shape(table);
    let mut answered_by = vec![0; chain.len()];
    let mut correct = 0usize;
    let mut paid = 0.0;
    for i in 0..n {
        for (l, &s) in chain.iter().enumerate() {
            paid += table.cost[i].get(s).copied().unwrap_or(0.0);
            let threshold = thresholds.get(l).copied().unwrap_or(f64::INFINITY);
            let last = l + 1 == chain.len();
            if last || table.score[i].get(s).is_some_and(|&v| v >= threshold) {
                answered_by[l] += 1;
                if table.right[i].get(s) == Some(&true) {
                    correct += 1;
                }
                break;
            }
        }
    }
    if n == 0 || chain.is_empty() {
        return Outcome {
            accuracy: 0.0,
            cost: 0.0,
            answered_by,
        };
    }
    Outcome {
        accuracy: correct as f64 / n as f64,
        cost: paid / n as f64,
        answered_by,
    }
}

/// The most accurate cascade whose mean cost on `table` is within `budget`: FrugalGPT's
/// optimisation, solved exactly over a grid of thresholds.
///
/// Chains are every non-empty increasing sequence of the table's stages (m stages give
/// 2^m - 1 chains; meant for m <= 6). At each non-final level the candidate thresholds are
/// the `grid`-quantiles (k/grid, k = 0..=grid) of that stage's scores among the items still
/// unanswered there, plus infinity (never answer there). The search goes depth first, so
/// the items reaching a level are sorted by score once per prefix, and every threshold's
/// split is then a prefix of that order; subtrees that already exceed the budget are cut when
/// costs are non-negative. Ties in accuracy go to the lower cost, then the shorter chain, then
/// the one found first. `None` when the table is empty or no cascade fits the budget.
pub fn search(table: &Table, budget: f64, grid: usize) -> Option<Plan> {
    let (n, m) = shape(table);
    if n == 0 || m == 0 {
        return None;
    }
    let prune = table.cost[..n]
        .iter()
        .all(|row| row[..m].iter().all(|&c| c >= 0.0));
    let mut searcher = Searcher {
        table,
        n,
        m,
        grid: grid.max(1),
        budget,
        prune,
        chain: Vec::with_capacity(m),
        thresholds: Vec::with_capacity(m),
        best: None,
    };
    let everyone: Vec<usize> = (0..n).collect();
    for s in 0..m {
        let paid: f64 = (0..n).map(|i| table.cost[i][s]).sum();
        if prune && !searcher.fits(paid) {
            continue;
        }
        let correct = (0..n).filter(|&i| table.right[i][s]).count();
        searcher.chain.push(s);
        searcher.consider(correct, paid);
        if s + 1 < m {
            searcher.expand(s, &everyone, paid, 0);
        }
        searcher.chain.pop();
    }
    let best = searcher.best?;
    // Report the plan as `simulate` accounts it, so the two always agree to the last bit.
    let outcome = simulate(&best.chain, &best.thresholds, table);
    Some(Plan {
        chain: best.chain,
        thresholds: best.thresholds,
        accuracy: outcome.accuracy,
        cost: outcome.cost,
    })
}

/// The number of items and stages every row of `table` has (the smallest, should the shapes
/// disagree, so nothing indexes out of bounds).
fn shape(table: &Table) -> (usize, usize) {
    debug_assert!(
        table.right.len() == table.cost.len() && table.cost.len() == table.score.len(),
        "right, cost and score have one row per item"
    );
    let n = table
        .right
        .len()
        .min(table.cost.len())
        .min(table.score.len());
    let stages = |i: usize| {
        let (a, b, c) = (
            table.right[i].len(),
            table.cost[i].len(),
            table.score[i].len(),
        );
        debug_assert!(
            a == b && b == c,
            "item {i} has one entry per stage in each field"
        );
        a.min(b).min(c)
    };
    let m = (0..n).map(stages).min().unwrap_or(0);
    (n, m)
}

/// The best cascade so far: right answers and total cost over all items.
struct Best {
    correct: usize,
    paid: f64,
    chain: Vec<usize>,
    thresholds: Vec<f64>,
}

/// The depth-first search's state: the chain being built, its thresholds, the best so far.
struct Searcher<'a> {
    table: &'a Table,
    n: usize,
    m: usize,
    grid: usize,
    budget: f64,
    /// Whether costs are non-negative, so a prefix over budget can be cut.
    prune: bool,
    chain: Vec<usize>,
    thresholds: Vec<f64>,
    best: Option<Best>,
}

impl Searcher<'_> {
    /// Whether a total cost `paid` over all items is within the budget per item.
    fn fits(&self, paid: f64) -> bool {
        paid / self.n as f64 <= self.budget + BUDGET_SLACK
    }

    /// Offers the current chain and thresholds, with `correct` right answers and total cost
    /// `paid`, as the best plan.
    fn consider(&mut self, correct: usize, paid: f64) {
        if !self.fits(paid) {
            return;
        }
        let better = match &self.best {
            None => true,
            Some(best) => {
                let (cost, best_cost) = (paid / self.n as f64, best.paid / self.n as f64);
                let tie = (cost - best_cost).abs() <= COST_TIE * cost.abs().max(best_cost.abs());
                correct > best.correct
                    || (correct == best.correct
                        && ((!tie && cost < best_cost)
                            || (tie && self.chain.len() < best.chain.len())))
            }
        };
        if better {
            self.best = Some(Best {
                correct,
                paid,
                chain: self.chain.clone(),
                thresholds: self.thresholds.clone(),
            });
        }
    }

    /// Extends the chain, whose last stage `s` is reached by `items`, by every later stage and
    /// every candidate threshold at `s`. `paid` is the total cost so far (stage `s` included),
    /// `correct` the right answers of the earlier stages.
    fn expand(&mut self, s: usize, items: &[usize], paid: f64, correct: usize) {
        let table = self.table;
        let score = |i: usize| table.score[i][s];
        // The items by descending score at `s`, missing (NaN) scores last: every threshold
        // answers a prefix of this order.
        let mut order = items.to_vec();
        order.sort_by(|&a, &b| descending(score(a), score(b)));
        let u = order.len();
        // right_before[a]: how many of the first `a` items stage `s` gets right.
        let mut right_before = vec![0usize; u + 1];
        for (a, &i) in order.iter().enumerate() {
            right_before[a + 1] = right_before[a] + usize::from(table.right[i][s]);
        }
        let candidates = self.candidates(&order, s);

        // cost_after[a], right_after[a]: the next stage's cost and right answers over the
        // items from position `a` on, the ones stage `s` passes on.
        let mut cost_after = vec![0.0; u + 1];
        let mut right_after = vec![0usize; u + 1];
        for next in s + 1..self.m {
            for a in (0..u).rev() {
                let i = order[a];
                cost_after[a] = cost_after[a + 1] + table.cost[i][next];
                right_after[a] = right_after[a + 1] + usize::from(table.right[i][next]);
            }
            for &(threshold, answered) in &candidates {
                let paid_next = paid + cost_after[answered];
                if self.prune && !self.fits(paid_next) {
                    continue;
                }
                let correct_next = correct + right_before[answered];
                self.chain.push(next);
                self.thresholds.push(threshold);
                self.consider(correct_next + right_after[answered], paid_next);
                // With nobody passed on, longer chains cost and score the same: never better.
                if next + 1 < self.m && answered < u {
                    self.expand(next, &order[answered..], paid_next, correct_next);
                }
                self.chain.pop();
                self.thresholds.pop();
            }
        }
    }

    /// The candidate thresholds at stage `s` for the items `order` (sorted by [`descending`]
    /// score there), each with how many items it answers: the distinct `grid`-quantiles of the
    /// present scores, ascending, then infinity.
    fn candidates(&self, order: &[usize], s: usize) -> Vec<(f64, usize)> {
        let score = |i: usize| self.table.score[i][s];
        let answered = |t: f64| order.partition_point(|&i| score(i) >= t);
        let present = order.partition_point(|&i| !score(i).is_nan());
        let mut out: Vec<(f64, usize)> = Vec::with_capacity(self.grid + 2);
        if present > 0 {
            for k in 0..=self.grid {
                // Rank k/grid of the ascending scores, rounded to the nearest item.
                let rank = (k * (present - 1) + self.grid / 2) / self.grid;
                let t = score(order[present - 1 - rank]);
                if out.last().is_some_and(|&(previous, _)| previous == t) {
                    continue;
                }
                out.push((t, answered(t)));
            }
        }
        if out
            .last()
            .is_none_or(|&(previous, _)| previous != f64::INFINITY)
        {
            out.push((f64::INFINITY, answered(f64::INFINITY)));
        }
        out
    }
}

/// Descending order of scores, NaN after every number.
fn descending(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (false, false) => b.total_cmp(&a),
        (a_nan, b_nan) => a_nan.cmp(&b_nan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::SplitMix64;

    fn uniform(rng: &mut SplitMix64) -> f64 {
        // 53 random bits to [0, 1), then to [-1, 1).
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// Three stages with prices 1, 2 and 4 (item 2 pays 2, 3 and 5), four items.
    fn three_stage_table() -> Table {
        Table {
            right: vec![
                vec![true, false, false],
                vec![true, false, true],
                vec![false, false, true],
                vec![false, true, true],
            ],
            cost: vec![
                vec![1.0, 2.0, 4.0],
                vec![1.0, 2.0, 4.0],
                vec![2.0, 3.0, 5.0],
                vec![1.0, 2.0, 4.0],
            ],
            score: vec![
                vec![0.9, 0.1, 0.1],
                vec![0.2, 0.8, 0.1],
                vec![0.4, 0.6, 0.1],
                vec![0.5, 0.9, 0.1],
            ],
        }
    }

    #[test]
    fn simulate_pays_every_visited_stage() {
        let table = three_stage_table();
        // Chain [0, 1, 2], thresholds [0.5, 0.7]:
        // item 0: 0.9 >= 0.5, stage 0 answers, right;          pays 1
        // item 1: 0.2 < 0.5, 0.8 >= 0.7, stage 1 answers, wrong; pays 1 + 2 = 3
        // item 2: 0.4 < 0.5, 0.6 < 0.7, stage 2 answers, right;  pays 2 + 3 + 5 = 10
        // item 3: 0.5 >= 0.5 (ties answer), stage 0, wrong;      pays 1
        // accuracy 2/4 = 0.5, cost (1 + 3 + 10 + 1) / 4 = 3.75.
        let outcome = simulate(&[0, 1, 2], &[0.5, 0.7], &table);
        assert_eq!(outcome.accuracy, 0.5);
        assert_eq!(outcome.cost, 3.75);
        assert_eq!(outcome.answered_by, vec![2, 1, 1]);
        // Chain [0, 2], threshold [0.5]: items 0 and 3 as above (right, wrong; pay 1 each),
        // items 1 and 2 go to stage 2 (both right; pay 1 + 4 = 5 and 2 + 5 = 7).
        // accuracy 3/4, cost (1 + 5 + 7 + 1) / 4 = 3.5.
        let outcome = simulate(&[0, 2], &[0.5], &table);
        assert_eq!(outcome.accuracy, 0.75);
        assert_eq!(outcome.cost, 3.5);
        assert_eq!(outcome.answered_by, vec![2, 2]);
        // One stage answers everything.
        let outcome = simulate(&[1], &[], &table);
        assert_eq!((outcome.accuracy, outcome.cost), (0.25, 2.25));
        let empty = simulate(&[0], &[], &Table::default());
        assert_eq!((empty.accuracy, empty.cost), (0.0, 0.0));
    }

    /// Stages A, B, C at prices 1, 3 and 10; four items.
    fn priced_table() -> Table {
        Table {
            right: vec![
                vec![true, true, true],
                vec![true, true, true],
                vec![false, true, true],
                vec![false, false, true],
            ],
            cost: vec![vec![1.0, 3.0, 10.0]; 4],
            score: vec![
                vec![0.9, 0.9, 0.5],
                vec![0.8, 0.8, 0.5],
                vec![0.2, 0.7, 0.5],
                vec![0.3, 0.1, 0.5],
            ],
        }
    }

    #[test]
    fn search_finds_the_hand_worked_optimum() {
        let table = priced_table();
        // Unlimited budget: only [A, B, C] with thresholds (0.8, 0.7) is right on all four:
        // A answers items 0 and 1 (pay 1 each), B item 2 (pays 1 + 3), C item 3 (pays 14);
        // cost (1 + 1 + 4 + 14) / 4 = 5. The rivals at full accuracy cost more: [B, C] at
        // 0.7 is (3 + 3 + 3 + 13) / 4 = 5.5, [A, C] at 0.8 is (1 + 1 + 11 + 11) / 4 = 6,
        // [C] is 10.
        let plan = search(&table, f64::INFINITY, 8).expect("a plan");
        assert_eq!(plan.chain, vec![0, 1, 2]);
        assert_eq!(plan.thresholds, vec![0.8, 0.7]);
        assert_eq!((plan.accuracy, plan.cost), (1.0, 5.0));

        // Budget 4: full accuracy is out of reach. Three right at least cost: [A, B] at 0.3,
        // A answers items 0, 1 (right) and 3 (wrong), B item 2 (right):
        // (1 + 1 + 4 + 1) / 4 = 1.75. [B] alone is 3 for the same accuracy, [A, B] at 0.8 is
        // (1 + 1 + 4 + 4) / 4 = 2.5, and [A, B, C] can only tie 1.75 with a longer chain.
        let plan = search(&table, 4.0, 8).expect("a plan");
        assert_eq!(plan.chain, vec![0, 1]);
        assert_eq!(plan.thresholds, vec![0.3]);
        assert_eq!((plan.accuracy, plan.cost), (0.75, 1.75));

        // A budget exactly at a plan's cost admits it.
        assert_eq!(search(&table, 5.0, 8).map(|p| p.cost), Some(5.0));
        // Below the cheapest stage nothing fits.
        assert_eq!(search(&table, 0.5, 8), None);
        assert_eq!(search(&Table::default(), 10.0, 8), None);
    }

    /// The best (accuracy, cost) over every chain and every threshold drawn from the distinct
    /// scores of the stage plus infinity, by simulation.
    fn brute_force(table: &Table, budget: f64) -> Option<(f64, f64)> {
        let m = table.right[0].len();
        let mut best: Option<(f64, f64)> = None;
        for mask in 1..(1usize << m) {
            let chain: Vec<usize> = (0..m).filter(|s| mask & (1 << s) != 0).collect();
            let levels: Vec<Vec<f64>> = chain[..chain.len() - 1]
                .iter()
                .map(|&s| {
                    let mut values: Vec<f64> = table.score.iter().map(|row| row[s]).collect();
                    values.push(f64::INFINITY);
                    values.sort_by(f64::total_cmp);
                    values.dedup();
                    values
                })
                .collect();
            let combinations: usize = levels.iter().map(Vec::len).product();
            for mut c in 0..combinations {
                let mut thresholds = Vec::new();
                for values in &levels {
                    thresholds.push(values[c % values.len()]);
                    c /= values.len();
                }
                let outcome = simulate(&chain, &thresholds, table);
                if outcome.cost > budget + BUDGET_SLACK {
                    continue;
                }
                let better = best.is_none_or(|(accuracy, cost)| {
                    outcome.accuracy > accuracy
                        || (outcome.accuracy == accuracy && outcome.cost < cost)
                });
                if better {
                    best = Some((outcome.accuracy, outcome.cost));
                }
            }
        }
        best
    }

    #[test]
    fn search_matches_brute_force() {
        let mut rng = SplitMix64(2023);
        for round in 0..100 {
            // Coarse scores, so ties between items are common.
            let mut table = Table::default();
            for _ in 0..8 {
                table
                    .right
                    .push((0..3).map(|_| rng.below(2) == 1).collect());
                table.cost.push(
                    (0..3)
                        .map(|s| rng.below(10) as f64 * 0.1 * (s + 1) as f64)
                        .collect(),
                );
                table
                    .score
                    .push((0..3).map(|_| rng.below(6) as f64 / 5.0).collect());
            }
            let budget = rng.below(30) as f64 * 0.1;
            for budget in [budget, f64::INFINITY] {
                let expected = brute_force(&table, budget);
                let found = search(&table, budget, 64);
                match (expected, &found) {
                    (None, None) => {}
                    (Some((accuracy, cost)), Some(plan)) => {
                        assert_eq!(plan.accuracy, accuracy, "round {round}: {plan:?}");
                        assert!((plan.cost - cost).abs() < 1e-9, "round {round}: {plan:?}");
                        let outcome = simulate(&plan.chain, &plan.thresholds, &table);
                        assert_eq!((outcome.accuracy, outcome.cost), (plan.accuracy, plan.cost));
                        assert!(plan.thresholds.iter().all(|t| t.is_finite()));
                    }
                    _ => panic!("round {round}: expected {expected:?}, found {found:?}"),
                }
            }
        }
    }

    #[test]
    fn search_four_stages_five_hundred_items() {
        // The size of a real dev split: stages getting dearer and better, noisy scores.
        let mut rng = SplitMix64(5);
        let mut table = Table::default();
        for _ in 0..500 {
            let difficulty = (uniform(&mut rng) + 1.0) / 2.0;
            let mut right = Vec::new();
            let mut score = Vec::new();
            for s in 0..4 {
                let skill = 0.3 + 0.2 * s as f64;
                right.push(difficulty < skill);
                let noise = 0.2 * uniform(&mut rng);
                score.push((skill - difficulty + 0.5 + noise).clamp(0.0, 1.0));
            }
            table.right.push(right);
            table.cost.push(vec![1.0, 2.0, 5.0, 20.0]);
            table.score.push(score);
        }
        let plan = search(&table, 8.0, 40).expect("a plan");
        assert!(plan.cost <= 8.0 + 1e-12);
        let outcome = simulate(&plan.chain, &plan.thresholds, &table);
        assert_eq!((outcome.accuracy, outcome.cost), (plan.accuracy, plan.cost));
        // At least as good as any single stage within the budget.
        for s in 0..3 {
            let alone = simulate(&[s], &[], &table);
            assert!(alone.cost > 8.0 || plan.accuracy >= alone.accuracy);
        }
    }
}
