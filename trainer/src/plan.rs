//! The order of training data: epochs of seeded shuffles (Fisher-Yates over SplitMix64),
//! grouped into rows (one example, or several packed) and micro-batches. The order depends
//! only on the seed and the epoch, so a resumed run regenerates it and continues at the saved
//! `(epoch, row)` position. Each micro-batch, training or validation, is padded up to the
//! recipe's length buckets (`train.length_buckets`); [`Plan::layout`] counts the shapes that
//! makes.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::{self, Batch, Tokenized};
use crate::recipe::Recipe;
use ft_eval::tasks::SplitMix64;

/// Fisher-Yates with SplitMix64.
pub fn shuffle(v: &mut [usize], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

/// The order of micro-batches: epochs of seeded shuffles, grouped into rows and micro-batches.
pub struct Plan {
    seed: u64,
    micro_batch_size: usize,
    packing: bool,
    max_seq_len: usize,
    val_limit: usize,
    grad_accum: usize,
    /// Row lengths micro-batches are padded up to (empty: to the longest row).
    buckets: Vec<usize>,
    /// Optimizer steps of the run.
    pub total_steps: usize,
}

impl Plan {
    /// The plan of a recipe over `train`.
    pub fn new(r: &Recipe, train: &[Tokenized]) -> Self {
        let mut plan = Self {
            seed: r.train.seed,
            micro_batch_size: r.train.micro_batch_size,
            packing: r.data.packing,
            max_seq_len: r.data.max_seq_len,
            val_limit: r.data.val_limit,
            grad_accum: r.train.grad_accum,
            buckets: r.length_buckets(),
            total_steps: 0,
        };
        if !plan.buckets.is_empty() {
            tracing::info!(
                "micro-batches padded to lengths {:?} (train.length_buckets)",
                plan.buckets
            );
        }
        plan.total_steps = match (r.train.max_steps, r.train.max_tokens) {
            (Some(steps), _) => steps,
            (None, Some(tokens)) => plan.steps_for_tokens(train, tokens),
            (None, None) => {
                let per_epoch = plan
                    .epoch_rows(train, 0)
                    .len()
                    .div_ceil(plan.micro_batch_size);
                (per_epoch * r.train.epochs)
                    .div_ceil(r.train.grad_accum)
                    .max(1)
            }
        };
        plan
    }

    /// The optimizer steps after which at least `tokens` non-padding tokens have been trained
    /// (the stream as the run will draw it, epochs repeating as needed).
    fn steps_for_tokens(&self, train: &[Tokenized], tokens: usize) -> usize {
        if train.iter().all(|t| t.ids.is_empty()) {
            return 1;
        }
        let mut cursor = self.cursor(0, 0);
        let (mut steps, mut seen) = (0, 0);
        while seen < tokens {
            for _ in 0..self.grad_accum {
                seen += cursor.next_batch(train, 0).real_tokens;
            }
            steps += 1;
        }
        steps
    }

    /// The lengths micro-batches are padded up to (empty: each to its longest row).
    pub fn length_buckets(&self) -> &[usize] {
        &self.buckets
    }

    /// Rows of epoch `epoch`: indices into the training examples.
    pub fn epoch_rows(&self, train: &[Tokenized], epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..train.len()).collect();
        shuffle(
            &mut order,
            self.seed.wrapping_add(0x9E37 * (epoch as u64 + 1)),
        );
        let lengths: Vec<usize> = order.iter().map(|&i| train[i].ids.len()).collect();
        data::rows(&lengths, self.packing, self.max_seq_len)
            .into_iter()
            .map(|row| row.into_iter().map(|k| order[k]).collect())
            .collect()
    }

    /// The stream position `(epoch, row)`.
    pub fn cursor(&self, epoch: usize, position: usize) -> Cursor<'_> {
        Cursor {
            plan: self,
            epoch,
            position,
            rows: None,
        }
    }

    /// Validation micro-batches (the first `val_limit` examples).
    pub fn val_batches(&self, val: &[Tokenized], pad: u32) -> Vec<Batch> {
        let val = &val[..val.len().min(self.val_limit)];
        let lengths: Vec<usize> = val.iter().map(|t| t.ids.len()).collect();
        let rows: Vec<Vec<&Tokenized>> = data::rows(&lengths, self.packing, self.max_seq_len)
            .into_iter()
            .map(|row| row.into_iter().map(|i| &val[i]).collect())
            .collect();
        rows.chunks(self.micro_batch_size)
            .map(|rows| Batch::with_buckets(rows, pad, &self.buckets))
            .collect()
    }

    /// The shapes of every micro-batch the run draws from `train` (all `total_steps` steps of
    /// `grad_accum` micro-batches) and of the validation batches of `val`. On a backend that
    /// compiles kernels per shape (CUDA), each distinct shape is compiled once.
    pub fn layout(&self, train: &[Tokenized], val: &[Tokenized], pad: u32) -> Layout {
        let draws = if train.is_empty() {
            0
        } else {
            self.total_steps * self.grad_accum
        };
        let mut cursor = self.cursor(0, 0);
        Layout {
            length_buckets: self.buckets.clone(),
            steps: self.total_steps,
            train: Shapes::of((0..draws).map(|_| cursor.next_batch(train, pad))),
            validation: Shapes::of(self.val_batches(val, pad)),
        }
    }
}

/// The micro-batch shapes of a run: what `ft recipe plan` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layout {
    /// Row lengths micro-batches are padded up to (empty: to the longest row).
    pub length_buckets: Vec<usize>,
    /// Optimizer steps.
    pub steps: usize,
    /// The training micro-batches of every step.
    pub train: Shapes,
    /// The validation batches (scored at every evaluation).
    pub validation: Shapes,
}

impl Layout {
    /// Distinct `[b, s]` over training and validation.
    pub fn distinct_shapes(&self) -> usize {
        let mut all: Vec<[usize; 2]> = (self.train.shapes.iter())
            .chain(&self.validation.shapes)
            .map(|c| c.shape)
            .collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }
}

/// Micro-batches counted by shape, with the tokens they hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Shapes {
    /// Micro-batches.
    pub batches: usize,
    /// Each distinct shape `[b, s]` and how many micro-batches have it, by shape.
    pub shapes: Vec<ShapeCount>,
    /// Tokens that are not padding.
    pub tokens: usize,
    /// Padding tokens.
    pub padding: usize,
}

/// One batch shape and how many micro-batches have it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShapeCount {
    /// `[b, s]`: rows, tokens per row.
    pub shape: [usize; 2],
    /// Micro-batches of this shape.
    pub batches: usize,
}

impl Shapes {
    /// Counts `batches`.
    fn of(batches: impl IntoIterator<Item = Batch>) -> Self {
        let mut out = Self::default();
        let mut counts: BTreeMap<[usize; 2], usize> = BTreeMap::new();
        for batch in batches {
            out.batches += 1;
            out.tokens += batch.real_tokens;
            out.padding += batch.b * batch.s - batch.real_tokens;
            *counts.entry([batch.b, batch.s]).or_default() += 1;
        }
        out.shapes = counts
            .into_iter()
            .map(|(shape, batches)| ShapeCount { shape, batches })
            .collect();
        out
    }
}

/// A position in the micro-batch stream: (epoch, row index within the epoch).
pub struct Cursor<'a> {
    plan: &'a Plan,
    epoch: usize,
    position: usize,
    rows: Option<Vec<Vec<usize>>>,
}

impl Cursor<'_> {
    /// The next micro-batch.
    pub fn next_batch(&mut self, train: &[Tokenized], pad: u32) -> Batch {
        let rows = self
            .rows
            .get_or_insert_with(|| self.plan.epoch_rows(train, self.epoch));
        if self.position >= rows.len() {
            self.epoch += 1;
            self.position = 0;
            *rows = self.plan.epoch_rows(train, self.epoch);
        }
        let end = (self.position + self.plan.micro_batch_size).min(rows.len());
        let picked: Vec<Vec<&Tokenized>> = rows[self.position..end]
            .iter()
            .map(|row| row.iter().map(|&i| &train[i]).collect())
            .collect();
        let mut batch = Batch::with_buckets(&picked, pad, &self.plan.buckets);
        batch.examples = rows[self.position..end].concat();
        self.position = end;
        batch
    }

    /// Where the next micro-batch starts.
    pub fn position(&self) -> (usize, usize) {
        (self.epoch, self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe;

    /// 45 examples of 3 to 59 tokens.
    fn examples() -> Vec<Tokenized> {
        (0..45u32)
            .map(|i| Tokenized::all_trained((0..3 + (i * 7) % 57).collect()))
            .collect()
    }

    fn plan(sets: &[&str]) -> (Plan, Recipe) {
        let text = "[data]\ntask = \"dates\"\nmax_seq_len = 64\n[train]\nmax_steps = 20\nmicro_batch_size = 4\n";
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let r = recipe::parse(text, &sets, "r.toml").unwrap();
        (Plan::new(&r, &examples()), r)
    }

    /// `train.max_tokens` ends the run at the first step whose tokens reach it, past the end
    /// of an epoch (the 45 examples hold about 1,400 tokens).
    #[test]
    fn max_tokens_takes_the_steps_that_train_that_many_tokens() {
        let train = examples();
        let text = "[data]\ntask = \"dates\"\nmax_seq_len = 64\n[train]\nmicro_batch_size = 4\n\
                    grad_accum = 2\nmax_tokens = 3000\n";
        let r = recipe::parse(text, &[], "r.toml").unwrap();
        let plan = Plan::new(&r, &train);
        let mut cursor = plan.cursor(0, 0);
        let mut step = || -> usize {
            (0..2)
                .map(|_| cursor.next_batch(&train, 0).real_tokens)
                .sum()
        };
        let before: usize = (1..plan.total_steps).map(|_| step()).sum();
        assert!(before < 3000, "{before}");
        assert!(before + step() >= 3000);
        assert!(cursor.position().0 >= 2, "it ran past the first epoch");
    }

    #[test]
    fn bucketed_batches_take_a_few_shapes_and_the_same_tokens() {
        let (train, val) = (examples(), examples()[..10].to_vec());
        let (tight, _) = plan(&[]);
        let (bucketed, _) = plan(&["train.length_buckets=[16, 32]"]);
        assert_eq!(bucketed.length_buckets(), [16, 32, 64]);
        let (a, b) = (
            tight.layout(&train, &val, 0),
            bucketed.layout(&train, &val, 0),
        );
        // Rows of 4 and the short last batches of 1 (train, 45 rows) and 2 (validation).
        assert!(a.distinct_shapes() > 9, "{a:?}");
        assert!(b.distinct_shapes() <= 3 * 3, "{b:?}");
        for shape in b.train.shapes.iter().chain(&b.validation.shapes) {
            assert!([16, 32, 64].contains(&shape.shape[1]), "{shape:?}");
        }
        // The same batches with the same tokens; only padding is added.
        assert_eq!(
            (a.train.batches, a.train.tokens),
            (b.train.batches, b.train.tokens)
        );
        assert_eq!(
            (a.validation.batches, a.validation.tokens),
            (b.validation.batches, b.validation.tokens)
        );
        assert!(b.train.padding > a.train.padding);
        let mut x = tight.cursor(0, 0);
        let mut y = bucketed.cursor(0, 0);
        for _ in 0..20 {
            let (x, y) = (x.next_batch(&train, 0), y.next_batch(&train, 0));
            assert_eq!(x.examples, y.examples);
            assert_eq!(x.loss_tokens(), y.loss_tokens());
        }
    }
}
