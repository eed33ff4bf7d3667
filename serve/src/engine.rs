//! The serving engine: iteration-level continuous batching (Yu et al. 2022, Orca) over a
//! paged KV cache with prefix caching, one batch mixing requests for different adapters.
//!
//! Each [`Engine::step`] admits waiting requests while blocks and batch slots allow, gives
//! every decoding sequence its next token and fills the rest of the step's token budget with
//! prompt chunks (chunked prefill), runs one ragged forward, then samples. When a sequence
//! needs a block and none is free, the most recently admitted request is preempted: its blocks
//! are freed and it waits again at the front of the queue, to be recomputed (vLLM's recompute
//! preemption).

use std::collections::VecDeque;

use ft_model::forward::ragged::{Segment, ServedAdapter};
use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::adapter_cache::AdapterCache;
use crate::beam::{self, Hypothesis};
use crate::blocks::BlockManager;
use crate::error::EngineError;
use crate::request::{Event, FinishReason, Priority, Request, RequestId, TokenLogprob};
use crate::runner::Runner;
use crate::sampling::Sampler;
use crate::sequence::Sequence;
use crate::text_stream::{Detokenize, TextStream};

/// Sizes and switches of an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache (its capacity is `kv_blocks * block_size` tokens).
    pub kv_blocks: usize,
    /// Tokens one step runs at most (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Requests running at once at most.
    pub max_running: usize,
    /// Requests waiting at most; more are refused with [`EngineError::QueueFull`].
    pub max_waiting: usize,
    /// Reuse the blocks of earlier requests with the same leading tokens.
    pub prefix_cache: bool,
    /// Adapters held in memory at most.
    pub max_adapters: usize,
    /// Tokens of batch requests (decode rows plus prompt chunks) one step runs at most: an
    /// interactive request that arrives while a step of batch work is under way waits for
    /// it, so this bounds what a batch adds to its time to first token.
    pub batch_step_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_blocks: 512,
            max_batch_tokens: 256,
            max_running: 32,
            max_waiting: 256,
            prefix_cache: true,
            max_adapters: 8,
            batch_step_tokens: 16,
        }
    }
}

/// Counters of an engine's work, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Requests waiting.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
    /// KV blocks referenced.
    pub blocks_used: usize,
    /// KV blocks in all.
    pub blocks_total: usize,
    /// Blocks kept by the prefix cache.
    pub blocks_cached: usize,
    /// Prefix cache block hits.
    pub prefix_hits: u64,
    /// Prefix cache block lookups.
    pub prefix_lookups: u64,
    /// Prompt tokens run through the model.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests preempted.
    pub preemptions: u64,
    /// Adapters in memory.
    pub adapters_loaded: usize,
    /// Adapter loads from disk since the start.
    pub adapter_loads: u64,
}

/// Prompt positions one request scores in a step at most: each is a row of logits over the
/// vocabulary (128 rows of a 151,936-token vocabulary are 78 MB).
const MAX_SCORED_ROWS: usize = 128;

/// A request the engine holds.
struct Active {
    id: RequestId,
    request: Request,
    prompt_len: usize,
    /// One sequence, or the live beams.
    seqs: Vec<Sequence>,
    sampler: Sampler,
    text: TextStream,
    generated: usize,
    finished_beams: Vec<Hypothesis>,
    /// Whether it holds a reference to its adapter.
    holds_adapter: bool,
    /// Whether a stop string ended it (its held-back text is the stop's).
    hit_stop_string: bool,
    /// The prefix cache's name for its adapter registration (`None`: the base).
    cache_key: Option<String>,
    /// The prompt's log-probabilities so far, when the request asked for them.
    prompt_scores: Vec<TokenLogprob>,
    /// Whether the prompt's log-probabilities are sent (or were not asked for).
    prompt_scored: bool,
    /// The stop token that ended it, with its log-probabilities if asked for.
    stop_token: Option<(u32, Option<TokenLogprob>)>,
}

impl Active {
    fn is_beam(&self) -> bool {
        self.request.params.beams > 1
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
struct Work {
    id: RequestId,
    seq: usize,
    len: usize,
    /// Tokens of a batch request (counted against [`EngineConfig::batch_step_tokens`]).
    batch: bool,
}

/// The rows of logits one share of a step has.
#[derive(Debug, Clone, Copy)]
struct Rows {
    /// Its first row in the step's logits.
    first: usize,
    /// How many.
    count: usize,
    /// The sequence position the first row is the output of.
    position: usize,
    /// Whether its last row gives the sequence's next token (all its tokens are computed).
    next: bool,
}

/// The logits of one step: a row of the vocabulary for each share of the step whose
/// sequence has all its tokens computed, and one for every position of a prompt being
/// scored, read in place rather than copied out per row (16 rows are 3 MB at SmolLM2's
/// vocabulary).
struct StepLogits {
    logits: Vec<f32>,
    vocab: usize,
    /// Per share of the step (in its order), its rows, if it has any.
    rows: Vec<Option<Rows>>,
}

impl StepLogits {
    /// Row `i` of the step.
    fn at(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Share `w`'s next-token logits, or `None` for a prompt chunk before the last.
    fn row(&self, w: usize) -> Option<&[f32]> {
        let r = self.rows[w].filter(|r| r.next)?;
        Some(self.at(r.first + r.count - 1))
    }
}

/// The engine: one base model, its adapters, the KV cache and the requests.
pub struct Engine<B: QuantBackend> {
    model: LlamaForCausalLM<B>,
    detokenize: Detokenize,
    runner: Runner<B>,
    blocks: BlockManager,
    adapters: AdapterCache<B>,
    config: EngineConfig,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    next_id: RequestId,
    stats: EngineStats,
}

impl<B: QuantBackend> Engine<B> {
    /// An engine over `model`, decoding text with `detokenize`.
    pub fn new(model: LlamaForCausalLM<B>, detokenize: Detokenize, config: EngineConfig) -> Self {
        let runner = Runner::new(&model, config.kv_blocks, config.block_size);
        Self::with_runner(model, detokenize, config, runner)
    }

    /// [`Engine::new`] over a forward chosen by the caller (tests run burn's where the host
    /// forward could run); `runner` holds `config.kv_blocks` blocks of `config.block_size`.
    pub(crate) fn with_runner(
        model: LlamaForCausalLM<B>,
        detokenize: Detokenize,
        config: EngineConfig,
        runner: Runner<B>,
    ) -> Self {
        Self {
            blocks: BlockManager::new(config.kv_blocks, config.block_size),
            adapters: AdapterCache::new(config.max_adapters),
            runner,
            model,
            detokenize,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
        }
    }

    /// The base model.
    pub fn model(&self) -> &LlamaForCausalLM<B> {
        &self.model
    }

    /// The adapters (register and unregister them through the engine).
    pub fn adapters(&self) -> &AdapterCache<B> {
        &self.adapters
    }

    /// Makes the PEFT folder `dir` servable as `name` (read and checked now).
    pub fn register_adapter(
        &mut self,
        name: &str,
        dir: std::path::PathBuf,
    ) -> Result<(), EngineError> {
        self.adapters.register(name, dir, &self.model)
    }

    /// Forgets adapter `name`; requests already running with it finish.
    pub fn unregister_adapter(&mut self, name: &str) -> Result<(), EngineError> {
        self.adapters.unregister(name)
    }

    /// The engine's counters now.
    pub fn stats(&self) -> EngineStats {
        let (prefix_hits, prefix_lookups) = self.blocks.hit_stats();
        EngineStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            blocks_used: self.blocks.used(),
            blocks_total: self.blocks.total(),
            blocks_cached: self.blocks.cached(),
            prefix_hits,
            prefix_lookups,
            adapters_loaded: self.adapters.loaded(),
            adapter_loads: self.adapters.loads(),
            ..self.stats
        }
    }

    /// Tokens the KV cache holds in all.
    pub fn capacity_tokens(&self) -> usize {
        self.config.kv_blocks * self.config.block_size
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queues `request`, checked against the model, the cache and the queue.
    pub fn submit(&mut self, request: Request) -> Result<RequestId, EngineError> {
        let p = &request.params;
        if request.prompt.is_empty() {
            return Err(EngineError::BadRequest("the prompt has no tokens".into()));
        }
        let vocab = self.model.model.embed_tokens.dims()[0];
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadRequest(format!(
                "prompt token {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        if p.beams > 1 && (p.max_tokens == 0 || p.prompt_logprobs.is_some()) {
            return Err(EngineError::BadRequest(
                "beam search needs max_tokens of at least 1 and scores no prompt".into(),
            ));
        }
        if p.beams == 0 || p.beams > self.config.max_batch_tokens {
            return Err(EngineError::BadRequest(format!(
                "beams: {} is not in 1..={} (the tokens one step runs)",
                p.beams, self.config.max_batch_tokens
            )));
        }
        let context = self.model.max_position_embeddings;
        let total = request.prompt.len().saturating_add(p.max_tokens);
        if total > context {
            return Err(EngineError::BadRequest(format!(
                "the prompt ({} tokens) plus max_tokens ({}) is {total} tokens, more than the \
                 model's context of {context}",
                request.prompt.len(),
                p.max_tokens
            )));
        }
        let bs = self.config.block_size;
        let needed = total.div_ceil(bs) * p.beams;
        if needed > self.blocks.total() {
            return Err(EngineError::BadRequest(format!(
                "the request needs {needed} KV blocks of {bs} tokens; the cache has {}",
                self.blocks.total()
            )));
        }
        if let Some(name) = &request.adapter {
            if !self.adapters.contains(name) {
                return Err(EngineError::UnknownModel(name.clone()));
            }
        }
        // Batch requests never crowd interactive ones out of the queue.
        let waiting = match request.priority {
            Priority::Interactive => self
                .waiting
                .iter()
                .filter(|a| a.request.priority == Priority::Interactive)
                .count(),
            Priority::Batch => self.waiting.len(),
        };
        if waiting >= self.config.max_waiting {
            return Err(EngineError::QueueFull(waiting));
        }
        let id = self.next_id;
        self.next_id += 1;
        // Blocks computed with one registration of an adapter never serve another.
        let cache_key = request
            .adapter
            .as_deref()
            .map(|n| format!("{n}#{}", self.adapters.generation(n).unwrap_or(0)));
        self.waiting.push_back(Active {
            id,
            prompt_len: request.prompt.len(),
            seqs: vec![Sequence::new(request.prompt.clone(), cache_key.as_deref())],
            cache_key,
            sampler: Sampler::new(p.sampling),
            text: TextStream::new(&p.stop_strings),
            generated: 0,
            finished_beams: Vec::new(),
            holds_adapter: false,
            hit_stop_string: false,
            prompt_scores: Vec::new(),
            prompt_scored: p.prompt_logprobs.is_none(),
            stop_token: None,
            request,
        });
        Ok(id)
    }

    /// Drops request `id` wherever it is, freeing its blocks. Whether it was there.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|a| a.id == id) {
            if let Some(a) = self.waiting.remove(i) {
                self.retire(a);
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|a| a.id == id) {
            let a = self.running.remove(i);
            self.retire(a);
            return true;
        }
        false
    }

    /// Runs one iteration: admission, scheduling, one forward, sampling.
    pub fn step(&mut self) -> Vec<Event> {
        let _span = tracing::info_span!("serve_step").entered();
        let mut events = Vec::new();
        self.admit(&mut events);
        let work = self.schedule();
        if work.is_empty() {
            return events;
        }
        let logits = self.forward(&work);
        self.score_prompts(&work, &logits, &mut events);
        self.sample(&work, &logits, &mut events);
        events
    }

    /// Moves waiting requests to running while slots, blocks and adapters allow: interactive
    /// ones first, each class in order. An interactive request with no room takes a running
    /// batch request's (the latest admitted), which waits to be recomputed.
    fn admit(&mut self, events: &mut Vec<Event>) {
        let bs = self.config.block_size;
        while let Some(i) = self
            .waiting
            .iter()
            .position(|a| a.request.priority == Priority::Interactive)
            .or_else(|| (!self.waiting.is_empty()).then_some(0))
        {
            let next = &self.waiting[i];
            let blocks_needed = next.seqs[0].tokens.len().div_ceil(bs);
            let no_room = self.running.len() >= self.config.max_running
                || blocks_needed > self.blocks.available();
            if no_room {
                // A batch request gives up its row only when that can make room: a free slot,
                // and enough blocks once every batch request's are back.
                let batch_blocks: usize = self
                    .running
                    .iter()
                    .filter(|a| a.request.priority == Priority::Batch)
                    .flat_map(|a| &a.seqs)
                    .map(|s| s.table.len())
                    .sum();
                let could_fit = blocks_needed <= self.blocks.available() + batch_blocks;
                let victim = self.running.iter().rposition(|a| {
                    a.request.priority == Priority::Batch
                        && (self.running.len() >= self.config.max_running
                            || a.seqs.iter().any(|s| !s.table.is_empty()))
                });
                match (next.request.priority, victim, could_fit) {
                    (Priority::Interactive, Some(victim), true) => {
                        self.preempt(victim);
                        continue;
                    }
                    _ => break,
                }
            }
            let next = &mut self.waiting[i];
            if let (Some(name), false) = (next.request.adapter.clone(), next.holds_adapter) {
                match self.adapters.acquire(&name, &self.model) {
                    Ok(true) => next.holds_adapter = true,
                    Ok(false) => break,
                    Err(e) => {
                        let id = next.id;
                        if let Some(a) = self.waiting.remove(i) {
                            self.retire(a);
                        }
                        events.push(Event::Failed { id, error: e });
                        continue;
                    }
                }
            }
            let Some(mut active) = self.waiting.remove(i) else {
                break;
            };
            // A prompt being scored needs the logits of every position: computed whole.
            if self.config.prefix_cache && active.prompt_scored {
                active.seqs[0].reuse_prefix(&mut self.blocks);
            }
            // Interactive requests run ahead of batch ones, so each step's token budget
            // goes to them first; the latest batch request stays last, the first to yield.
            let at = match active.request.priority {
                Priority::Interactive => self
                    .running
                    .iter()
                    .position(|a| a.request.priority == Priority::Batch)
                    .unwrap_or(self.running.len()),
                Priority::Batch => self.running.len(),
            };
            self.running.insert(at, active);
        }
    }

    /// This step's work: every decoding sequence one token, then prompt chunks, within the
    /// token budget; blocks are reserved for all of it, preempting when they run out. While
    /// an interactive request runs, batch requests sit the step out (they keep their blocks),
    /// so the interactive ones step as fast as on an idle engine; batch requests take at most
    /// [`EngineConfig::batch_step_tokens`] a step, so a step already under way when an
    /// interactive request arrives is short.
    fn schedule(&mut self) -> Vec<Work> {
        let mut work: Vec<Work> = Vec::new();
        let mut budget = self.config.max_batch_tokens;
        let mut batch_budget = self.config.batch_step_tokens;
        let interactive = self
            .running
            .iter()
            .any(|a| a.request.priority == Priority::Interactive);
        for decoding in [true, false] {
            let mut r = 0;
            while r < self.running.len() {
                let active = &self.running[r];
                let id = active.id;
                let batch = active.request.priority == Priority::Batch;
                if batch && (interactive || batch_budget == 0) {
                    r += 1;
                    continue;
                }
                let is_decode = active
                    .seqs
                    .iter()
                    .all(|s| s.pending() <= 1 && s.computed > 0);
                let pending: usize = active.seqs.iter().map(Sequence::pending).sum();
                if is_decode != decoding || pending == 0 || budget == 0 {
                    r += 1;
                    continue;
                }
                // A request's sequences run together (the beams of one step): if they do not
                // fit what is left of this step, they wait for the next. (A batch request
                // with more beams than a step's batch tokens runs alone.)
                let over_batch_budget =
                    batch && pending > batch_budget && batch_budget < self.config.batch_step_tokens;
                if decoding && (pending > budget || over_batch_budget) {
                    r += 1;
                    continue;
                }
                // A prompt being scored wants a row of logits per token: a few at a time.
                let cap = if active.prompt_scored {
                    budget
                } else {
                    budget.min(MAX_SCORED_ROWS)
                };
                let cap = if batch { cap.min(batch_budget) } else { cap };
                let lens: Vec<usize> = active.seqs.iter().map(|s| s.pending().min(cap)).collect();
                let mut ok = true;
                for (s, &len) in lens.iter().enumerate() {
                    if !self.reserve(r, s, len) {
                        ok = false;
                        break;
                    }
                }
                if !ok {
                    // Preempt the latest batch request, else the latest request (possibly
                    // this one), and retry.
                    let victim = self
                        .running
                        .iter()
                        .rposition(|a| a.request.priority == Priority::Batch)
                        .unwrap_or(self.running.len() - 1);
                    self.preempt(victim);
                    if victim < r {
                        r -= 1;
                    }
                    let running = &self.running;
                    work.retain(|w| {
                        let keep = running.iter().any(|a| a.id == w.id);
                        if !keep {
                            budget += w.len; // the preempted request's share comes back
                            if w.batch {
                                batch_budget += w.len;
                            }
                        }
                        keep
                    });
                    continue;
                }
                for (s, &len) in lens.iter().enumerate() {
                    work.push(Work {
                        id,
                        seq: s,
                        len,
                        batch,
                    });
                    budget -= len;
                    if batch {
                        batch_budget = batch_budget.saturating_sub(len);
                    }
                }
                r += 1;
            }
        }
        work
    }

    /// Makes sequence `s` of running request `r` able to store `len` more positions: a new
    /// block when the last is full, a private copy of a shared partial block. Whether it could.
    fn reserve(&mut self, r: usize, s: usize, len: usize) -> bool {
        let bs = self.config.block_size;
        let seq = &mut self.running[r].seqs[s];
        let first = seq.computed / bs;
        if let Some(&shared) = seq.table.get(first).filter(|&&b| self.blocks.is_shared(b)) {
            let Some(copy) = self.blocks.allocate() else {
                return false;
            };
            self.runner.copy_block(shared, copy);
            self.blocks.release(shared);
            seq.table[first] = copy;
        }
        while seq.table.len() * bs < seq.computed + len {
            match self.blocks.allocate() {
                Some(b) => seq.table.push(b),
                None => return false,
            }
        }
        true
    }

    /// Frees running request `r`'s blocks and queues it again first, to recompute.
    fn preempt(&mut self, r: usize) {
        let mut active = self.running.remove(r);
        self.stats.preemptions += 1;
        for seq in &mut active.seqs {
            seq.release(&mut self.blocks);
        }
        if active.is_beam() {
            // Beams restart from the prompt: only the best one is ever sent.
            let prompt = active.request.prompt.clone();
            active.seqs = vec![Sequence::new(prompt, active.cache_key.as_deref())];
            active.finished_beams.clear();
            active.generated = 0;
        }
        self.waiting.push_front(active);
    }

    /// Runs the step's ragged forward; returns the logits of every sequence whose tokens
    /// are now all computed, and of every position of the prompts being scored.
    fn forward(&mut self, work: &[Work]) -> StepLogits {
        let at: Vec<usize> = work
            .iter()
            .map(|w| self.running.iter().position(|a| a.id == w.id).unwrap_or(0))
            .collect();
        // Rows of one adapter next to each other, so each adapter runs once per linear.
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&w| self.running[at[w]].request.adapter.clone());
        let mut names: Vec<&str> = Vec::new();
        let mut ids = Vec::new();
        let mut segments = Vec::with_capacity(work.len());
        let mut tables = Vec::with_capacity(work.len());
        // Logits only for the sequences that will have all their tokens computed, and for the
        // prompts being scored.
        let mut wanted = Vec::new();
        let mut rows = vec![None; work.len()];
        for &w in &order {
            let active = &self.running[at[w]];
            let (s, len) = (&active.seqs[work[w].seq], work[w].len);
            let adapter = active.request.adapter.as_deref().map(|n| {
                names.iter().position(|&m| m == n).unwrap_or_else(|| {
                    names.push(n);
                    names.len() - 1
                })
            });
            let next = s.computed + len == s.tokens.len();
            let from = if !active.prompt_scored && s.computed < active.prompt_len {
                0
            } else if next {
                len - 1
            } else {
                len
            };
            if from < len {
                rows[w] = Some(Rows {
                    first: wanted.len(),
                    count: len - from,
                    position: s.computed + from,
                    next,
                });
                wanted.extend((from..len).map(|j| ids.len() + j));
            }
            ids.extend_from_slice(&s.tokens[s.computed..s.computed + len]);
            segments.push(Segment {
                start: s.computed,
                len,
                adapter,
            });
            tables.push(s.table.as_slice());
        }
        let adapters: Vec<&ServedAdapter<B>> =
            names.iter().filter_map(|n| self.adapters.get(n)).collect();
        let logits = self
            .runner
            .logits(&self.model, &ids, &segments, &adapters, tables, &wanted);

        for &w in &order {
            let active = &mut self.running[at[w]];
            let prompt_len = active.prompt_len;
            let s = &mut active.seqs[work[w].seq];
            if s.computed < prompt_len {
                self.stats.prompt_tokens +=
                    (prompt_len.min(s.computed + work[w].len) - s.computed) as u64;
            }
            s.computed += work[w].len;
            s.seal_full_blocks(&mut self.blocks, self.config.prefix_cache);
        }
        StepLogits {
            vocab: logits.len().checked_div(wanted.len()).unwrap_or(0),
            logits,
            rows,
        }
    }

    /// Scores the prompt positions this step computed for requests that asked for
    /// `prompt_logprobs`, and sends the scores once their prompt is whole. A preempted
    /// request recomputes positions already scored; they are skipped.
    fn score_prompts(&mut self, work: &[Work], logits: &StepLogits, events: &mut Vec<Event>) {
        for (w, share) in work.iter().zip(&logits.rows) {
            let Some(rows) = share else { continue };
            let Some(a) = self.running.iter_mut().find(|a| a.id == w.id) else {
                continue;
            };
            let Some(k) = a
                .request
                .params
                .prompt_logprobs
                .filter(|_| !a.prompt_scored)
            else {
                continue;
            };
            for j in 0..rows.count {
                let p = rows.position + j;
                if p + 1 >= a.prompt_len || p != a.prompt_scores.len() {
                    continue;
                }
                let lp = beam::log_softmax(logits.at(rows.first + j));
                let token = a.request.prompt[p + 1] as usize;
                a.prompt_scores.push(TokenLogprob {
                    logprob: lp[token],
                    top: beam::top_k(&lp, k),
                });
            }
            if a.seqs[0].computed >= a.prompt_len {
                a.prompt_scored = true;
                events.push(Event::Prompt {
                    id: a.id,
                    logprobs: std::mem::take(&mut a.prompt_scores),
                });
            }
        }
    }

    /// Picks the next tokens of every request that has logits, and finishes requests.
    fn sample(&mut self, work: &[Work], logits: &StepLogits, events: &mut Vec<Event>) {
        let mut done: Vec<(RequestId, FinishReason)> = Vec::new();
        let mut r = 0;
        while r < self.running.len() {
            let id = self.running[r].id;
            let rows: Vec<(usize, &[f32])> = work
                .iter()
                .enumerate()
                .filter(|(_, w)| w.id == id)
                .filter_map(|(i, w)| logits.row(i).map(|l| (w.seq, l)))
                .collect();
            if rows.is_empty() {
                r += 1;
                continue;
            }
            let finish = if self.running[r].is_beam() {
                self.beam_step(r, rows, events)
            } else {
                self.sample_one(r, rows[0].1, events)
            };
            if let Some(reason) = finish {
                done.push((id, reason));
            }
            r += 1;
        }
        for (id, reason) in done {
            if let Some(i) = self.running.iter().position(|a| a.id == id) {
                let mut a = self.running.remove(i);
                let text = if a.hit_stop_string {
                    String::new() // a stop string's text is never part of the output
                } else {
                    a.text.finish(&self.detokenize)
                };
                events.push(Event::Finished {
                    id,
                    reason,
                    text,
                    prompt_tokens: a.prompt_len,
                    completion_tokens: a.generated,
                    stop_token: a.stop_token.take(),
                });
                a.seqs.iter_mut().for_each(|s| s.release(&mut self.blocks));
                self.retire(a);
            }
        }
    }

    /// Samples one token for a single-sequence request; the reason if it is done.
    fn sample_one(
        &mut self,
        r: usize,
        row: &[f32],
        events: &mut Vec<Event>,
    ) -> Option<FinishReason> {
        let context = self.model.max_position_embeddings;
        let a = &mut self.running[r];
        if a.request.params.max_tokens == 0 {
            return Some(FinishReason::Length);
        }
        let token = a.sampler.sample(row);
        let params = &a.request.params;
        let logprob = params.logprobs.map(|k| {
            let lp = beam::log_softmax(row);
            TokenLogprob {
                logprob: lp[token as usize],
                top: beam::top_k(&lp, k),
            }
        });
        if params.stop_ids.contains(&token) {
            a.stop_token = Some((token, logprob));
            return Some(FinishReason::Stop);
        }
        a.seqs[0].tokens.push(token);
        a.generated += 1;
        self.stats.generated_tokens += 1;
        let (text, stopped) = a.text.push(token, &self.detokenize);
        events.push(Event::Token {
            id: a.id,
            token,
            text,
            logprob,
        });
        if stopped {
            a.hit_stop_string = true;
            Some(FinishReason::Stop)
        } else if a.generated >= params.max_tokens || a.seqs[0].tokens.len() >= context {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// One beam search step for request `r` from its beams' logits; when the search is over,
    /// the best hypothesis is sent as tokens and the reason returned.
    fn beam_step(
        &mut self,
        r: usize,
        rows: Vec<(usize, &[f32])>,
        events: &mut Vec<Event>,
    ) -> Option<FinishReason> {
        let a = &mut self.running[r];
        let n = a.request.params.beams;
        let max_tokens = a.request.params.max_tokens;
        let mut rows = rows;
        rows.sort_by_key(|(s, _)| *s);
        let lps: Vec<Vec<f32>> = rows.iter().map(|(_, l)| beam::log_softmax(l)).collect();
        let sums: Vec<f64> = a.seqs.iter().map(|s| s.sum_logprob).collect();
        let step = beam::step(&lps, &sums, n, &a.request.params.stop_ids);
        let gen = a.generated + 1;
        for &(b, sum) in &step.finished {
            let tokens = a.seqs[b].tokens[a.prompt_len..].to_vec();
            a.finished_beams.push(Hypothesis {
                tokens,
                score: sum / gen as f64,
                stopped: true,
            });
        }
        let mut next = Vec::with_capacity(step.beams.len());
        for &(b, token, sum) in &step.beams {
            let mut s = a.seqs[b].fork(&mut self.blocks);
            s.tokens.push(token);
            s.sum_logprob = sum;
            next.push(s);
        }
        for mut old in std::mem::replace(&mut a.seqs, next) {
            old.release(&mut self.blocks);
        }
        a.generated = gen;
        let best_live = a
            .seqs
            .iter()
            .map(|s| s.sum_logprob)
            .fold(f64::NEG_INFINITY, f64::max);
        let over = a.seqs.is_empty()
            || gen >= max_tokens
            || beam::is_done(&a.finished_beams, best_live, gen, n);
        if !over {
            return None;
        }
        if gen >= max_tokens {
            for s in &a.seqs {
                a.finished_beams.push(Hypothesis {
                    tokens: s.tokens[a.prompt_len..].to_vec(),
                    score: s.sum_logprob / gen as f64,
                    stopped: false,
                });
            }
        }
        let best = beam::best(&a.finished_beams).cloned()?;
        a.generated = best.tokens.len();
        self.stats.generated_tokens += best.tokens.len() as u64;
        let mut stopped = best.stopped;
        for &token in &best.tokens {
            let (text, hit) = a.text.push(token, &self.detokenize);
            events.push(Event::Token {
                id: a.id,
                token,
                text,
                logprob: None,
            });
            if hit {
                a.hit_stop_string = true;
                stopped = true;
                break;
            }
        }
        Some(if stopped {
            FinishReason::Stop
        } else {
            FinishReason::Length
        })
    }

    /// Releases everything a request that leaves the engine holds.
    fn retire(&mut self, mut a: Active) {
        for s in &mut a.seqs {
            s.release(&mut self.blocks);
        }
        if a.holds_adapter {
            if let Some(name) = &a.request.adapter {
                self.adapters.release(name);
            }
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
