//! The order of training data: epochs of seeded shuffles (Fisher-Yates over SplitMix64),
//! grouped into rows (one example, or several packed) and micro-batches. The order depends
//! only on the seed and the epoch, so a resumed run regenerates it and continues at the saved
//! `(epoch, row)` position.

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
            total_steps: 0,
        };
        plan.total_steps = r.train.max_steps.unwrap_or_else(|| {
            let per_epoch = plan
                .epoch_rows(train, 0)
                .len()
                .div_ceil(plan.micro_batch_size);
            (per_epoch * r.train.epochs)
                .div_ceil(r.train.grad_accum)
                .max(1)
        });
        plan
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
            .map(|rows| Batch::new(rows, pad))
            .collect()
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
        let mut batch = Batch::new(&picked, pad);
        batch.examples = rows[self.position..end].concat();
        self.position = end;
        batch
    }

    /// Where the next micro-batch starts.
    pub fn position(&self) -> (usize, usize) {
        (self.epoch, self.position)
    }
}
