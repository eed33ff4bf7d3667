//! Bundled tasks: small skills whose answers can be checked exactly, generated
//! deterministically from a seed (so the committed JSONL under `data/tasks/` can be rebuilt
//! byte for byte with `ft data tasks`), each with 2,000 training and 200 held-out examples
//! in the `completion` format. The held-out prompts never occur in the training split.
//!
//! - `dates`: rewrite a written date as ISO 8601 (`March 5, 2021` -> `2021-03-05`).
//! - `units`: convert a metric quantity by a power of ten (`3.5 km to m` -> `3500`).
//! - `sort`: sort four words alphabetically.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Training examples per task.
pub const TRAIN: usize = 2000;
/// Held-out examples per task.
pub const TEST: usize = 200;

/// A bundled task's name, what it asks and its committed splits.
#[derive(Debug, Clone, Copy)]
pub struct Task {
    /// The name recipes and `ft eval --tasks` use.
    pub name: &'static str,
    /// One line on what it asks.
    pub about: &'static str,
    /// `train.jsonl` as committed.
    pub train: &'static str,
    /// `test.jsonl` as committed.
    pub test: &'static str,
    generate: fn(&mut SplitMix64) -> Example,
}

/// All bundled tasks.
pub const TASKS: [Task; 3] = [
    Task {
        name: "dates",
        about: "rewrite a written date as YYYY-MM-DD",
        train: include_str!("../../data/tasks/dates/train.jsonl"),
        test: include_str!("../../data/tasks/dates/test.jsonl"),
        generate: date,
    },
    Task {
        name: "units",
        about: "convert a metric quantity by a power of ten",
        train: include_str!("../../data/tasks/units/train.jsonl"),
        test: include_str!("../../data/tasks/units/test.jsonl"),
        generate: units,
    },
    Task {
        name: "sort",
        about: "sort four words alphabetically",
        train: include_str!("../../data/tasks/sort/train.jsonl"),
        test: include_str!("../../data/tasks/sort/test.jsonl"),
        generate: sort,
    },
];

/// The bundled task called `name`.
pub fn find(name: &str) -> Option<&'static Task> {
    TASKS.iter().find(|t| t.name == name)
}

/// Names of the bundled tasks, comma-separated (for error messages).
pub fn names() -> String {
    TASKS.map(|t| t.name).join(", ")
}

/// One prompt and the answer a model must produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The prompt, ending where the answer starts.
    pub prompt: String,
    /// The answer, with its leading space.
    pub completion: String,
}

impl Task {
    /// Regenerates the splits from the task's seed: `(train, test)` as JSONL text.
    pub fn generate(&self) -> (String, String) {
        let (train, test, _) = self.draw(0);
        let lines = |examples: Vec<Example>| {
            examples
                .iter()
                .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
                .collect()
        };
        (lines(train), lines(test))
    }

    /// `n` more examples drawn after the committed splits from the same generator: in
    /// neither of them, so neither the held-out score nor an adapter trained on the training
    /// split sees them (a development split, to fit on). Fewer where the task's prompts run
    /// out.
    pub fn dev_examples(&self, n: usize) -> Vec<Example> {
        self.draw(n).2
    }

    /// The training, held-out and `dev` further examples, each prompt new.
    fn draw(&self, dev: usize) -> (Vec<Example>, Vec<Example>, Vec<Example>) {
        let seed = self
            .name
            .bytes()
            .fold(0x5EED_u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        let mut rng = SplitMix64(seed);
        let mut seen = HashSet::new();
        // A generator whose prompts run out gives fewer than asked, never a hang.
        let mut draw = |n: usize| {
            let mut out = Vec::with_capacity(n);
            let mut tries = 0;
            while out.len() < n && tries < 100 * n {
                tries += 1;
                let e = (self.generate)(&mut rng);
                if seen.insert(e.prompt.clone()) {
                    out.push(e);
                }
            }
            out
        };
        let test = draw(TEST);
        let train = draw(TRAIN);
        (train, test, draw(dev))
    }

    /// The held-out examples.
    pub fn test_examples(&self) -> Vec<Example> {
        parse(self.test)
    }

    /// The training examples (few-shot demonstrations are drawn from these).
    pub fn train_examples(&self) -> Vec<Example> {
        parse(self.train)
    }
}

/// The examples of a committed JSONL split.
fn parse(jsonl: &str) -> Vec<Example> {
    jsonl
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// SplitMix64 (Steele et al. 2014): a tiny generator whose output never changes with crate
/// versions, so the committed data stays reproducible.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

fn date(rng: &mut SplitMix64) -> Example {
    let year = 1950 + rng.below(100);
    let month = rng.below(12);
    let days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month];
    let day = 1 + rng.below(days);
    let written = if rng.below(2) == 0 {
        format!("{} {day}, {year}", MONTHS[month])
    } else {
        format!("{day} {} {year}", MONTHS[month])
    };
    Example {
        prompt: format!("Write the date in ISO format (YYYY-MM-DD).\nDate: {written}\nISO:"),
        completion: format!(" {year}-{:02}-{day:02}", month + 1),
    }
}

fn units(rng: &mut SplitMix64) -> Example {
    // (larger unit, smaller unit, how many smaller in one larger)
    const PAIRS: [(&str, &str, u32); 6] = [
        ("km", "m", 3),
        ("m", "cm", 2),
        ("cm", "mm", 1),
        ("kg", "g", 3),
        ("L", "mL", 3),
        ("g", "mg", 3),
    ];
    let (big, small, exp) = PAIRS[rng.below(PAIRS.len())];
    let value = 1 + rng.below(999) as u64;
    let (from, to, answer) = if rng.below(2) == 0 {
        (big, small, (value * 10u64.pow(exp)).to_string())
    } else {
        (small, big, shift_left(value, exp))
    };
    Example {
        prompt: format!("Convert the quantity.\n{value} {from} in {to}:"),
        completion: format!(" {answer}"),
    }
}

/// `value / 10^exp` written without trailing zeros.
fn shift_left(value: u64, exp: u32) -> String {
    let div = 10u64.pow(exp);
    let (whole, frac) = (value / div, value % div);
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:0width$}", width = exp as usize);
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

const WORDS: [&str; 48] = [
    "apple", "bread", "chair", "dog", "eagle", "forest", "garden", "house", "island", "jacket",
    "kitten", "lemon", "mountain", "night", "orange", "pencil", "queen", "river", "summer",
    "table", "umbrella", "valley", "window", "yellow", "zebra", "anchor", "butter", "candle",
    "desert", "engine", "flower", "guitar", "hammer", "iron", "jungle", "kettle", "ladder",
    "mirror", "needle", "ocean", "pepper", "rabbit", "silver", "tiger", "violin", "winter",
    "basket", "cotton",
];

fn sort(rng: &mut SplitMix64) -> Example {
    let mut words: Vec<&str> = Vec::with_capacity(4);
    while words.len() < 4 {
        let w = WORDS[rng.below(WORDS.len())];
        // Distinct first letters: the order is decided by the first letter alone.
        if !words.iter().any(|x| x.as_bytes()[0] == w.as_bytes()[0]) {
            words.push(w);
        }
    }
    let mut sorted = words.clone();
    sorted.sort_unstable();
    Example {
        prompt: format!(
            "Sort the words alphabetically.\nWords: {}\nSorted:",
            words.join(", ")
        ),
        completion: format!(" {}", sorted.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_examples_are_new_and_the_same_every_time() {
        for task in TASKS {
            let dev = task.dev_examples(300);
            assert_eq!(dev.len(), 300, "{}", task.name);
            assert_eq!(dev, task.dev_examples(300));
            let committed: HashSet<String> = task
                .train_examples()
                .into_iter()
                .chain(task.test_examples())
                .map(|e| e.prompt)
                .collect();
            assert!(
                dev.iter().all(|e| !committed.contains(&e.prompt)),
                "{}",
                task.name
            );
        }
    }

    #[test]
    fn committed_data_is_what_the_generators_make() {
        for task in TASKS {
            let (train, test) = task.generate();
            assert!(
                train == task.train,
                "{}: train.jsonl differs; run `ft data tasks`",
                task.name
            );
            assert!(
                test == task.test,
                "{}: test.jsonl differs; run `ft data tasks`",
                task.name
            );
            assert_eq!(train.lines().count(), TRAIN);
            assert_eq!(test.lines().count(), TEST);
            let train_prompts: HashSet<&str> = train.lines().collect();
            assert!(test.lines().all(|l| !train_prompts.contains(l)));
        }
    }

    #[test]
    fn answers_are_right() {
        assert_eq!(shift_left(3500, 3), "3.5");
        assert_eq!(shift_left(42, 3), "0.042");
        assert_eq!(shift_left(700, 2), "7");
        let mut rng = SplitMix64(1);
        for _ in 0..50 {
            let e = date(&mut rng);
            let iso = e.completion.trim();
            let (y, m, d) = (&iso[..4], &iso[5..7], &iso[8..]);
            let month = MONTHS[m.parse::<usize>().unwrap() - 1];
            let day = d.parse::<u32>().unwrap().to_string();
            assert!(e.prompt.contains(month) && e.prompt.contains(y) && e.prompt.contains(&day));
            let s = sort(&mut rng);
            let words: Vec<&str> = s.completion.trim().split(", ").collect();
            assert!(words.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        }
    }
}
