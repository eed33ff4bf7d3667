//! A seeded mutation fuzzer for ft's parsers: every input is a mutation of a valid seed file,
//! reproducible from the target's name, the run seed and the input's index.
//!
//! Each input runs under [`catch_unwind`] with this thread's heap use counted by [`Counting`]
//! (the fuzz binary's global allocator) and its time measured; a panic, a heap peak over the
//! target's bound or a time over [`MAX_SECONDS`] is a failure, recorded once per distinct place
//! with the input that caused it (written under `target/fuzz/`). An input that would take the
//! heap past [`HEAP_CAP`] is written out and the process aborted before the machine runs out of
//! memory; one still running after [`HANG_SECONDS`] is named by a watchdog thread and the
//! process aborted, so that a hang fails the run instead of stalling it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ft_eval::tasks::SplitMix64;
use serde_json::Value;

/// The longest one input may take before it counts as a hang.
pub const MAX_SECONDS: f64 = 10.0;

/// An input still running after this long is taken for a hang: the watchdog names it and
/// aborts the run, which then fails instead of waiting forever.
const HANG_SECONDS: u64 = 120;

/// The input a fuzzing run is on (its index and bytes) and since when, for its watchdog.
type Current = std::sync::Arc<std::sync::Mutex<Option<(Instant, u64, Vec<u8>)>>>;

/// Watches `current` from a thread of its own until `done`: an input past [`HANG_SECONDS`] is
/// written out and the process aborted, naming its target, run seed and index.
fn watchdog(name: String, seed: u64, current: Current, done: std::sync::mpsc::Receiver<()>) {
    std::thread::spawn(move || loop {
        // Done, or the run unwound and dropped its end of the channel.
        if !matches!(
            done.recv_timeout(Duration::from_secs(1)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        ) {
            return;
        }
        let Ok(c) = current.lock() else { continue };
        let Some((since, index, input)) = c.as_ref() else {
            continue;
        };
        if since.elapsed() > Duration::from_secs(HANG_SECONDS) {
            let path = out_dir().join(format!("{name}-{index}.bin"));
            let _ = std::fs::create_dir_all(out_dir());
            let _ = std::fs::write(&path, input);
            eprintln!(
                "fuzz {name}: input {index} of run seed {seed} ({}) has run over \
                 {HANG_SECONDS} s: a hang",
                path.display()
            );
            std::process::abort();
        }
    });
}

/// The largest input a run makes.
pub const MAX_INPUT: usize = 8 << 20;

/// Heap bytes one input may hold at once before the run is stopped (1 GiB).
pub const HEAP_CAP: usize = 1 << 30;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread runs a fuzz input (its heap is capped and its panics recorded).
    static ARMED: Cell<bool> = const { Cell::new(false) };
    /// The running input, written out if it passes the heap cap.
    static INPUT: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The system allocator, counting the bytes each thread holds and its peak.
pub struct Counting;

// SAFETY: every call is passed to `System` unchanged; only thread-local counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size());
        } else {
            shrank(layout.size() - new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

fn grew(bytes: usize) {
    // `try_with`: the counters may be gone while a thread exits.
    let live = LIVE
        .try_with(|l| {
            let v = l.get().saturating_add(bytes);
            l.set(v);
            v
        })
        .unwrap_or(0);
    let _ = PEAK.try_with(|p| p.set(p.get().max(live)));
    if live > HEAP_CAP && ARMED.try_with(|a| a.replace(false)).unwrap_or(false) {
        over_cap(live);
    }
}

fn shrank(bytes: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(bytes)));
}

/// Writes the running input out and aborts: it would have taken the machine's memory.
fn over_cap(live: usize) -> ! {
    let (ptr, len) = INPUT.with(Cell::get);
    let path = out_dir().join("over-heap-cap.bin");
    if !ptr.is_null() {
        // SAFETY: set from a live slice by `run_one`, which outlives the input's run.
        let input = unsafe { std::slice::from_raw_parts(ptr, len) };
        let _ = std::fs::create_dir_all(out_dir());
        let _ = std::fs::write(&path, input);
    }
    eprintln!(
        "fuzz: an input took the heap to {live} bytes, past the cap of {HEAP_CAP}; it is in {}",
        path.display()
    );
    std::process::abort()
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz")
}

/// Inputs' random draws: SplitMix64 seeded per input, so input `i` of a run is drawn without
/// the others.
pub struct Rng(SplitMix64);

impl Rng {
    /// A generator for input `index` of the run `seed` of target `name`.
    pub fn for_input(name: &str, seed: u64, index: u64) -> Self {
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut r = Rng(SplitMix64(
            name_hash ^ seed.rotate_left(17) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that sit on the edges parsers get wrong: zero, one, sign bits, powers of two
/// around the widths of sizes and counts, all ones.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x100,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 53,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Applies one to four byte-level mutations to `data`; positions fall inside `focus` (the
/// part of the file worth mutating, such as a header) most of the time.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, focus: std::ops::Range<usize>) {
    let ops = 1 + usize::from(rng.chance(0.3)) + rng.below(3) * usize::from(rng.chance(0.2));
    for _ in 0..ops {
        let at = |rng: &mut Rng, len: usize| {
            let (lo, hi) = (focus.start.min(len), focus.end.min(len));
            if hi > lo && rng.chance(0.85) {
                lo + rng.below(hi - lo)
            } else {
                rng.below(len.max(1))
            }
        };
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = at(rng, len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = at(rng, len);
                data[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'[', b'\n']);
            }
            2 | 3 if len >= 8 => {
                let width = *rng.pick(&[1usize, 2, 4, 8]);
                let mut i = at(rng, len - width + 1).min(len - width);
                if rng.chance(0.5) {
                    i -= i % width;
                }
                let value = rng.pick(&INTERESTING).to_le_bytes();
                data[i..i + width].copy_from_slice(&value[..width]);
            }
            4 if len > 0 => {
                let i = at(rng, len);
                let n = (1 + rng.below(16)).min(len - i);
                data.drain(i..i + n);
            }
            5 => {
                let i = at(rng, len + 1).min(len);
                let n = 1 + rng.below(32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            6 if len > 0 => {
                let from = at(rng, len);
                let n = (1 + rng.below(64)).min(len - from);
                let chunk = data[from..from + n].to_vec();
                let to = at(rng, len);
                data.splice(to..to, chunk);
            }
            7 if len > 0 => data.truncate(at(rng, len)),
            _ => data.push(rng.next_u64() as u8),
        }
    }
}

/// Applies one structural mutation to a JSON value: a node replaced by an edge value, removed,
/// repeated or nested, or a key added.
pub fn mutate_json(rng: &mut Rng, root: &mut Value) {
    let mut paths = Vec::new();
    collect_paths(root, &mut Vec::new(), &mut paths);
    let path = rng.pick(&paths).clone();
    let Some(node) = get_mut(root, &path) else {
        return;
    };
    match rng.below(10) {
        0..=3 => *node = edge_value(rng, node),
        4 if !path.is_empty() => {
            let (last, parent_path) = path.split_last().expect("a non-empty path");
            if let Some(parent) = get_mut(root, parent_path) {
                match (parent, last) {
                    (Value::Object(m), Step::Key(k)) => {
                        m.remove(k);
                    }
                    (Value::Array(a), Step::Index(i)) if *i < a.len() => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        5 => match node {
            Value::Array(a) if !a.is_empty() => {
                let item = a[rng.below(a.len())].clone();
                let n = *rng.pick(&[1usize, 10, 1000]);
                a.extend(std::iter::repeat_n(item, n));
            }
            Value::Object(m) => {
                let key = rng
                    .pick(&["", "r", "unknown", "layers", "max_tokens", "n"])
                    .to_string();
                m.insert(key, edge_value(rng, &Value::Null));
            }
            _ => *node = Value::Array(vec![node.clone()]),
        },
        6 => {
            let mut v = node.clone();
            for _ in 0..rng.below(200) {
                v = Value::Array(vec![v]);
            }
            *node = v;
        }
        7 => match node {
            Value::String(s) => {
                let mut bytes = s.clone().into_bytes();
                mutate_bytes(rng, &mut bytes, 0..usize::MAX);
                *s = String::from_utf8_lossy(&bytes).into_owned();
            }
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                let scaled = f * rng.pick(&[-1.0, 0.5, 2.0, 1e6, 1e-6, 1e300]);
                *node = serde_json::Number::from_f64(scaled).map_or(Value::Null, Value::Number);
            }
            _ => *node = edge_value(rng, node),
        },
        _ => {
            let other = rng.pick(&paths).clone();
            if let Some(v) = get_mut(root, &other).map(|v| v.clone()) {
                if let Some(node) = get_mut(root, &path) {
                    *node = v;
                }
            }
        }
    }
}

/// A value from the edges: most of the time of the same type as `like` (extreme or odd numbers,
/// empty, huge or hostile strings, flipped booleans), else of another type.
fn edge_value(rng: &mut Rng, like: &Value) -> Value {
    use serde_json::json;
    let same_type = rng.chance(0.7);
    match like {
        Value::Number(n) if same_type => match rng.below(6) {
            0 => json!(*rng.pick(&[0, 1, -1, 2, 3, 7, 64, 255, 256, 65536])),
            1 => json!(*rng.pick(&INTERESTING)),
            2 => json!((*rng.pick(&INTERESTING) as i64).wrapping_neg()),
            3 => json!(*rng.pick(&[1e308, -1e308, 1e-39, -1e-39, 5e-324, 0.5, -0.0, 1e16, 2.5])),
            4 => {
                let f = n.as_f64().unwrap_or(0.0) * rng.pick(&[-1.0, 0.5, 2.0, 1e6, 1e-6, 1e300]);
                serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            _ => json!(n
                .as_i64()
                .unwrap_or(0)
                .wrapping_add(rng.below(5) as i64 - 2)),
        },
        Value::String(s) if same_type => match rng.below(5) {
            0 => json!(""),
            1 => json!("x".repeat(*rng.pick(&[1usize, 100, 10_000, 300_000]))),
            2 => json!(*rng.pick(&[
                "\u{0}",
                "../../etc/passwd",
                "/dev/zero",
                "\u{202e}",
                "%s%n{{x}}",
                "NaN",
                "-1",
                "1e999",
                "e\u{301}\u{fffd}",
                "registry:x:999999999999",
            ])),
            3 => json!(s.repeat(1 + rng.below(4))),
            _ => {
                let mut bytes = s.clone().into_bytes();
                mutate_bytes(rng, &mut bytes, 0..usize::MAX);
                json!(String::from_utf8_lossy(&bytes))
            }
        },
        Value::Bool(b) if same_type => json!(!b),
        Value::Array(a) if same_type && !a.is_empty() => {
            let mut a = a.clone();
            match rng.below(3) {
                0 => a.clear(),
                1 => {
                    let item = a[rng.below(a.len())].clone();
                    let n = *rng.pick(&[1usize, 10, 1000]);
                    a.extend(std::iter::repeat_n(item, n));
                }
                _ => {
                    let i = rng.below(a.len());
                    a.remove(i);
                }
            }
            Value::Array(a)
        }
        _ => match rng.below(9) {
            0 => Value::Null,
            1 => json!(rng.chance(0.5)),
            2 => json!(-1),
            3 => json!(*rng.pick(&INTERESTING)),
            4 => json!(1e308),
            5 => json!(""),
            6 => json!([]),
            7 => json!({}),
            _ => json!([like.clone()]),
        },
    }
}

/// A JSON document's mutation: structural (one [`mutate_json`]) with probability
/// `structural`, else of its bytes; bytes that are not JSON are always mutated as bytes.
pub fn mutate_json_document(rng: &mut Rng, text: &[u8], structural: f64) -> Vec<u8> {
    match serde_json::from_slice::<Value>(text) {
        Ok(mut v) if rng.chance(structural) => {
            mutate_json(rng, &mut v);
            serde_json::to_vec(&v).expect("a JSON value serializes")
        }
        _ => {
            let mut v = text.to_vec();
            let n = v.len();
            mutate_bytes(rng, &mut v, 0..n);
            v
        }
    }
}

/// One step of a path into a JSON value.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn collect_paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                here.push(Step::Key(k.clone()));
                collect_paths(child, here, out);
                here.pop();
            }
        }
        // Long arrays (token lists) contribute a few entries, not thousands.
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate().take(8) {
                here.push(Step::Index(i));
                collect_paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn get_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, step| match (v, step) {
        (Value::Object(m), Step::Key(k)) => m.get_mut(k),
        (Value::Array(a), Step::Index(i)) => a.get_mut(*i),
        _ => None,
    })
}

/// What a target did with an input.
#[derive(Debug)]
pub enum Outcome {
    /// Parsed (and used) without error.
    Accepted,
    /// Refused with an error message.
    Rejected(String),
}

/// One distinct failure and the first input that showed it.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong and where.
    pub what: String,
    /// The input's index in the run.
    pub index: u64,
    /// Where the input was written.
    pub input: PathBuf,
}

/// What a fuzzing run of one target found.
#[derive(Debug)]
pub struct Report {
    /// The target.
    pub name: String,
    /// Inputs run.
    pub inputs: u64,
    /// Inputs the target accepted.
    pub accepted: u64,
    /// Distinct failures.
    pub failures: Vec<Failure>,
    /// The largest heap peak of one input of 4 KiB or more over its size.
    pub max_heap_ratio: f64,
    /// The largest heap peak of one input, in bytes.
    pub max_heap: usize,
    /// The longest input.
    pub max_time: Duration,
    /// How often each refusal (its first words) came, to see how deep the inputs get.
    pub refusals: BTreeMap<String, u64>,
}

impl Report {
    /// A line for the fuzzing table: inputs, accepted, failures, heap and time bounds.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {:.1} MiB ({:.1}x its input) | {:.0} ms |",
            self.name,
            self.inputs,
            self.accepted,
            self.failures.len(),
            self.max_heap as f64 / (1u64 << 20) as f64,
            self.max_heap_ratio,
            self.max_time.as_secs_f64() * 1e3
        )
    }

    /// Panics with every failure, if there was one.
    pub fn assert_clean(&self) {
        println!("{}", self.row());
        if std::env::var_os("FT_FUZZ_VERBOSE").is_some() {
            let mut common: Vec<_> = self.refusals.iter().collect();
            common.sort_by(|a, b| b.1.cmp(a.1));
            for (why, n) in common.into_iter().take(12) {
                println!("    {n:>7}  {why}");
            }
        }
        if !self.failures.is_empty() {
            let lines: Vec<String> = self
                .failures
                .iter()
                .map(|f| format!("  input {} ({}): {}", f.index, f.input.display(), f.what))
                .collect();
            panic!(
                "fuzzing {} found {} distinct failures:\n{}",
                self.name,
                self.failures.len(),
                lines.join("\n")
            );
        }
    }
}

/// How many inputs a run takes: `FT_FUZZ_INPUTS` if set, else `default`; and its seed,
/// `FT_FUZZ_SEED` or 1.
pub fn budget(default: u64) -> (u64, u64) {
    let env = |key: &str| std::env::var(key).ok().and_then(|v| v.parse().ok());
    (
        env("FT_FUZZ_INPUTS").unwrap_or(default),
        env("FT_FUZZ_SEED").unwrap_or(1),
    )
}

/// A parser under fuzzing.
pub struct Target<'a> {
    /// Names the run, its inputs' seeds and its failure files.
    pub name: &'a str,
    /// Valid inputs that mutations start from.
    pub seeds: Vec<Vec<u8>>,
    /// Makes an input from a seed.
    pub mutate: &'a dyn Fn(&mut Rng, &[u8]) -> Vec<u8>,
    /// Runs the parser on an input.
    pub run: &'a dyn Fn(&[u8]) -> Outcome,
    /// Heap bytes an input of `n` bytes may peak at.
    pub heap_bound: &'a dyn Fn(usize) -> usize,
}

/// Runs `inputs` mutated inputs through `target` from run seed `seed`.
pub fn fuzz(target: &Target, inputs: u64, seed: u64) -> Report {
    install_panic_hook();
    let mut report = Report {
        name: target.name.to_string(),
        inputs,
        accepted: 0,
        failures: Vec::new(),
        max_heap_ratio: 0.0,
        max_heap: 0,
        max_time: Duration::ZERO,
        refusals: BTreeMap::new(),
    };
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    let current = Current::default();
    let (done, watched) = std::sync::mpsc::channel();
    watchdog(target.name.to_string(), seed, current.clone(), watched);
    for index in 0..inputs {
        let mut rng = Rng::for_input(target.name, seed, index);
        let mut input = target.seeds[rng.below(target.seeds.len())].clone();
        // One mutation most of the time, so that many inputs get past the first checks.
        let rounds = 1 + usize::from(rng.chance(0.3)) + usize::from(rng.chance(0.15));
        for _ in 0..rounds {
            let next = (target.mutate)(&mut rng, &input);
            // Repeated repetition grows inputs without bound; past 8 MiB a mutation is dropped.
            if next.len() <= MAX_INPUT {
                input = next;
            }
        }
        if let Ok(mut c) = current.lock() {
            *c = Some((Instant::now(), index, input.clone()));
        }
        let (result, heap, time) = run_one(target, &input);
        report.max_heap = report.max_heap.max(heap);
        // Against inputs of some size: a few bytes' heap is mostly the parser's fixed cost.
        if input.len() >= 4096 {
            report.max_heap_ratio = report.max_heap_ratio.max(heap as f64 / input.len() as f64);
        }
        report.max_time = report.max_time.max(time);
        let mut problems = Vec::new();
        match result {
            Ok(Outcome::Accepted) => report.accepted += 1,
            Ok(Outcome::Rejected(why)) => {
                let words: String = why
                    .split_whitespace()
                    .filter(|w| !w.contains('/') && !w.contains(|c: char| c.is_ascii_digit()))
                    .take(8)
                    .collect::<Vec<_>>()
                    .join(" ");
                *report.refusals.entry(words).or_default() += 1;
            }
            Err(panic) => problems.push(format!("panic: {panic}")),
        }
        let bound = (target.heap_bound)(input.len());
        if heap > bound {
            problems.push(format!(
                "heap peaked at {heap} bytes for an input of {}, over the bound of {bound}",
                input.len()
            ));
        }
        if time.as_secs_f64() > MAX_SECONDS {
            problems.push(format!("took {:.1} s", time.as_secs_f64()));
        }
        for what in problems {
            // One report per place: the message up to its first digit-free location.
            let key = what
                .split(" for an input")
                .next()
                .unwrap_or(&what)
                .to_string();
            let key = key.split(" bytes").next().unwrap_or(&key).to_string();
            if seen.insert(key, ()).is_some() {
                continue;
            }
            let path = out_dir().join(format!("{}-{index}.bin", target.name));
            let _ = std::fs::create_dir_all(out_dir());
            let _ = std::fs::write(&path, &input);
            report.failures.push(Failure {
                what,
                index,
                input: path,
            });
        }
    }
    let _ = done.send(());
    report
}

/// Runs one input: its outcome (or panic message), heap peak and time.
fn run_one(target: &Target, input: &[u8]) -> (Result<Outcome, String>, usize, Duration) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    INPUT.with(|i| i.set((input.as_ptr(), input.len())));
    PANIC.with(|p| p.borrow_mut().take());
    ARMED.with(|a| a.set(true));
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let time = start.elapsed();
    ARMED.with(|a| a.set(false));
    INPUT.with(|i| i.set((std::ptr::null(), 0)));
    let heap = PEAK.with(Cell::get).saturating_sub(base);
    let result = result.map_err(|_| {
        PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "a panic without a message".into())
    });
    (result, heap, time)
}

/// Records the message and place of a panic on a fuzzing thread instead of printing it.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if ARMED.with(Cell::get) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let place = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                PANIC.with(|p| *p.borrow_mut() = Some(format!("{place}: {message}")));
            } else {
                default(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_reproducible_from_name_seed_and_index() {
        let draw = |i| {
            let mut rng = Rng::for_input("x", 7, i);
            let mut v = b"{\"a\": [1, 2, 3], \"b\": \"text\"}".to_vec();
            mutate_bytes(&mut rng, &mut v, 0..8);
            v
        };
        assert_eq!(draw(3), draw(3));
        assert!(
            (0..20)
                .map(draw)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 10
        );
    }

    #[test]
    fn json_mutations_keep_most_of_the_document() {
        let seed: Value = serde_json::json!({"r": 8, "target_modules": ["q_proj"], "alpha": 16.0});
        let mut changed = 0;
        for i in 0..200 {
            let mut rng = Rng::for_input("json", 1, i);
            let mut v = seed.clone();
            mutate_json(&mut rng, &mut v);
            changed += usize::from(v != seed);
        }
        assert!(
            changed > 150,
            "{changed} of 200 mutations changed the document"
        );
    }
}
