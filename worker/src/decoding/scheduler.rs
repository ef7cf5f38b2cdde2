//! Continuous batching: the scheduler that owns the running batch on the engine thread.
//!
//! Iteration-level scheduling, as TGI's router and vLLM's scheduler do it. Before each decode step the
//! scheduler admits waiting sequences within two budgets, sequences (`max_batch_size`) and KV positions
//! allocated over the batch (`max_batch_tokens`); each newcomer's prompt runs its own prefill pass and its
//! keys are copied into free rows of the batch's [`SlotCache`]. Then one forward pass advances every
//! sequence, whatever its strategy: greedy and sampling rows feed one token, a contrastive row feeds its
//! `top_k` candidates as queries of its own row, a beam search feeds one token per beam row. A sequence that
//! finishes, fails or is cancelled leaves at once: its rows are freed and the rows after it packed down.
//!
//! Joins are rate-limited as TGI's `waiting_served_ratio` / `max_waiting_tokens` do: while a batch runs,
//! newcomers join when they are numerous enough against the running sequences, or when they have waited
//! `max_waiting_steps` steps, so constant arrivals cannot starve decoding with prefills. An empty batch
//! admits at once: a lone job never waits for company. Admission is first come, first served: a sequence
//! that does not fit now waits (those behind it wait too, so a big job is not starved by small ones), and
//! one that can never fit the budget is refused when it is submitted.
//!
//! Cost per step: the new tokens' keys are written in place; no step copies the cache. Joins copy the
//! newcomer's prefill (and, when the allocation must grow, the rows in use); leaving copies the rows after
//! the leaver; beam search copies its own rows when it reorders them.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use super::error::{DecodeError, Result, panic_message};
use super::finish::Decoded;
use super::machine::Machine;
use super::sequence::{Choice, Common, Context};
use super::stop::TextDecoder;
use super::tensors::{i64_tensor, to_vec_i64};
use crate::lm::{CausalLm, KvCache, Logits, SlotCache, SlotStep};
use shared::GenerationPlan;
use tch::{Device, Kind, Tensor};

/// The scheduler's budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Sequences in the running batch at most.
    pub max_batch_size: usize,
    /// KV-cache positions allocated over the whole batch at most (rows × positions per row).
    pub max_batch_tokens: usize,
    /// While a batch runs, waiting sequences join once they have waited this many steps...
    pub max_waiting_steps: usize,
    /// ... or once they are at least this share of the running sequences.
    pub waiting_served_ratio: f64,
    /// Newcomers of one join round are prefilled together, left-padded, up to this many padded prompt
    /// tokens (TGI's `max_batch_prefill_tokens`); one prompt alone may exceed it.
    pub max_prefill_tokens: usize,
}

impl Limits {
    /// No budget but the model's context: offline generation of a known set of prompts.
    pub fn unbounded() -> Self {
        Self {
            max_batch_size: usize::MAX,
            max_batch_tokens: usize::MAX,
            max_waiting_steps: 0,
            waiting_served_ratio: 0.0,
            max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS,
        }
    }
}

/// TGI's default `max_batch_prefill_tokens`.
pub const DEFAULT_MAX_PREFILL_TOKENS: usize = 4096;

/// A sequence to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    /// Token ids, not empty.
    pub prompt: Vec<i64>,
    pub plan: GenerationPlan,
}

/// A sequence that left the batch done: its decoded tokens and where its time went.
#[derive(Debug, Clone)]
pub struct FinishedSequence {
    pub decoded: Decoded,
    pub prompt_tokens: usize,
    /// Submission to joining the batch.
    pub queued: Duration,
    /// Submission to the first token (beam search: to its answer).
    pub time_to_first_token: Duration,
    /// Joining the batch to the end, including its prefill.
    pub inference: Duration,
    /// The most sequences the running batch held while this one was in it.
    pub batch_size: usize,
}

/// What a step reports.
#[derive(Debug)]
pub enum Event {
    /// The sequence joined the running batch (its prefill ran).
    Joined { id: u64, batch_size: usize },
    /// New tokens (greedy, sampling and contrastive search report them as they come; beam search only
    /// knows its tokens at the end).
    Tokens { id: u64, tokens: Vec<i64> },
    /// The sequence left the batch: done, or failed alone.
    Finished {
        id: u64,
        result: std::result::Result<FinishedSequence, DecodeError>,
    },
}

/// Gauges for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    pub rows: usize,
    /// KV positions holding real keys.
    pub kv_used: usize,
    /// KV positions allocated.
    pub kv_allocated: usize,
    pub max_batch_tokens: usize,
}

struct Waiting {
    request: Request,
    arrived: Instant,
    /// Its strategy's state machine, built once at submission.
    machine: Machine,
    /// The most positions it can cache: prompt + max_new_tokens - 1.
    need: usize,
}

struct Running {
    id: u64,
    common: Common,
    machine: Machine,
    /// First cache row; rows `row0..row0 + machine.rows()`.
    row0: usize,
    /// Positions cached per row.
    len: usize,
    /// The most positions the sequence can cache: prompt + max_new_tokens - 1 (the last token is not fed).
    need: usize,
    /// The last pass's logits for this sequence's rows, `[rows, vocab]`.
    logits: Option<Tensor>,
    /// Where those rows are in the scheduler's `step_logits` (`None` after a prefill).
    logits_row: Option<usize>,
    arrived: Instant,
    joined: Instant,
    first_token: Option<Instant>,
    emitted: usize,
    batch_size: usize,
}

/// The running batch and the queue in front of it.
pub struct Scheduler<'a> {
    ctx: Context<'a>,
    limits: Limits,
    cache: SlotCache,
    running: Vec<Running>,
    waiting: VecDeque<Waiting>,
    steps_since_join: usize,
    /// The last decode pass's logits, every sequence's rows: plain greedy rows take their argmax from one
    /// call over all of it (one host sync a step, not one a sequence).
    step_logits: Option<Tensor>,
}

impl<'a> Scheduler<'a> {
    pub fn new(model: &'a dyn CausalLm, text: &'a dyn TextDecoder, limits: Limits) -> Self {
        let info = model.info();
        Self {
            ctx: Context {
                model,
                text,
                eos: info.eos_token_id,
            },
            limits,
            cache: SlotCache::new(info.n_layer),
            running: Vec::new(),
            waiting: VecDeque::new(),
            steps_since_join: 0,
            step_logits: None,
        }
    }

    /// Overrides the model's end-of-sequence id (`None`: generation ends only at length or a stop).
    pub fn set_eos(&mut self, eos: Option<i64>) {
        self.ctx.eos = eos;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Queues a sequence, or refuses one that could never run: an empty prompt, one longer than the
    /// context, or one whose KV positions alone exceed the batch budget.
    pub fn submit(&mut self, request: Request) -> Result<()> {
        if request.prompt.is_empty() {
            return Err(DecodeError::Invalid("a prompt has no tokens".into()));
        }
        let n_positions = self.ctx.model.info().n_positions;
        let total = request.prompt.len() + request.plan.max_new_tokens;
        if total > n_positions {
            let e = DecodeError::Invalid(format!(
                "the prompt has {} tokens; with max_new_tokens {} that exceeds the model's context of \
                 {n_positions} positions",
                request.prompt.len(),
                request.plan.max_new_tokens
            ));
            return Err(e);
        }
        let machine = Machine::for_plan(&request.plan, self.ctx.model.info().vocab_size);
        let alone = machine.rows() * (total - 1 + machine.queries());
        if alone > self.limits.max_batch_tokens {
            let e = DecodeError::TooLarge(format!(
                "the job needs {alone} KV-cache positions ({} rows × {} positions: prompt {} + \
                 max_new_tokens {}), more than the worker's whole batch budget of {} (--max-batch-tokens)",
                machine.rows(),
                total - 1 + machine.queries(),
                request.prompt.len(),
                request.plan.max_new_tokens,
                self.limits.max_batch_tokens
            ));
            return Err(e);
        }
        self.waiting.push_back(Waiting {
            request,
            arrived: Instant::now(),
            machine,
            need: total - 1,
        });
        Ok(())
    }

    /// Whether anything is running or waiting.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Removes a sequence, waiting or running; `false` when it is not here (finished, or never submitted).
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.request.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            self.running.remove(i);
            self.pack();
            return true;
        }
        false
    }

    pub fn stats(&self) -> Stats {
        Stats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            rows: self.rows_used(),
            kv_used: self.running.iter().map(|r| r.machine.rows() * r.len).sum(),
            kv_allocated: self.cache.capacity(),
            max_batch_tokens: self.limits.max_batch_tokens,
        }
    }

    /// Admits what may join, then advances every running sequence by one step.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.admit(&mut events);
        if self.running.is_empty() {
            return events;
        }
        self.steps_since_join += 1;
        let batch = self.running.len();
        for r in &mut self.running {
            r.batch_size = r.batch_size.max(batch);
        }

        // First half: every sequence decides what it feeds.
        let argmax = self.batch_argmax();
        let mut feeds: Vec<Option<Vec<i64>>> = Vec::with_capacity(self.running.len());
        let mut done: Vec<(usize, Result<Decoded>)> = Vec::new();
        for i in 0..self.running.len() {
            let (ctx, cache, seq) = (&self.ctx, &mut self.cache, &mut self.running[i]);
            let hint = seq
                .logits_row
                .and_then(|r| argmax.as_ref().and_then(|a| a.get(r).copied()));
            match guarded(|| choose(seq, cache, hint, ctx)) {
                Ok(Choice::Feed(tokens)) => feeds.push(Some(tokens)),
                Ok(Choice::Done(d)) => {
                    feeds.push(None);
                    done.push((i, Ok(d)));
                }
                Err(e) => {
                    feeds.push(None);
                    done.push((i, Err(e)));
                }
            }
            self.report_tokens(i, &mut events);
        }
        self.finish(done, &mut events);
        let feeds: Vec<Vec<i64>> = feeds.into_iter().flatten().collect();
        if self.running.is_empty() {
            return events;
        }

        // The forward pass over every row, then the second half.
        match guarded(|| self.forward(&feeds)) {
            Ok(done) => self.finish(done, &mut events),
            Err(e) => {
                // A failed pass cannot be pinned on one sequence: every sequence in it fails.
                tracing::error!(error = %e, sequences = self.running.len(), "a batch forward pass failed");
                let all = (0..self.running.len())
                    .map(|i| {
                        (
                            i,
                            Err(DecodeError::Invalid(format!(
                                "the batch's forward pass failed: {e}"
                            ))),
                        )
                    })
                    .collect();
                self.finish(all, &mut events);
            }
        }
        for i in 0..self.running.len() {
            self.report_tokens(i, &mut events);
        }
        events
    }

    /// The argmax of every row of the last pass's logits, when at least two plain greedy sequences would
    /// otherwise each compute and read back their own.
    fn batch_argmax(&mut self) -> Option<Vec<i64>> {
        let logits = self.step_logits.take()?;
        let plain = self
            .running
            .iter()
            .filter(|r| r.logits_row.is_some())
            .filter(|r| matches!(&r.machine, Machine::Pick(p) if p.is_plain_argmax(&r.common)))
            .count();
        if plain < 2 {
            return None;
        }
        match logits
            .f_argmax(-1, false)
            .map_err(DecodeError::from)
            .and_then(|a| to_vec_i64(&a))
        {
            Ok(a) => Some(a),
            Err(e) => {
                // Each sequence computes its own instead.
                tracing::warn!(error = %e, "the batch argmax failed");
                None
            }
        }
    }

    fn rows_used(&self) -> usize {
        self.running.iter().map(|r| r.machine.rows()).sum()
    }

    fn queries(&self) -> usize {
        self.running
            .iter()
            .map(|r| r.machine.queries())
            .max()
            .unwrap_or(1)
    }

    fn admit(&mut self, events: &mut Vec<Event>) {
        if self.waiting.is_empty() {
            return;
        }
        if !self.running.is_empty() {
            let many =
                self.waiting.len() as f64 >= self.limits.waiting_served_ratio * self.running.len() as f64;
            if !many && self.steps_since_join < self.limits.max_waiting_steps {
                return;
            }
        }
        // Who joins this round, and the allocation the batch needs with them.
        let mut picked: Vec<Waiting> = Vec::new();
        let mut rows = self.rows_used();
        let mut queries = self.queries();
        let mut longest = self.running.iter().map(|r| r.need).max().unwrap_or(0);
        let mut alloc = (self.cache.rows(), self.cache.positions());
        let mut longest_prompt = 0;
        while let Some(w) = self.waiting.front() {
            if self.running.len() + picked.len() >= self.limits.max_batch_size {
                break;
            }
            let (machine, need, p) = (&w.machine, w.need, w.request.prompt.len());
            let (r, q, l) = (
                rows + machine.rows(),
                queries.max(machine.queries()),
                longest.max(need),
            );
            let positions = l + q;
            let next_alloc = if r <= alloc.0 && positions <= alloc.1 {
                alloc
            } else {
                let positions = positions.max(alloc.1);
                let most = self.limits.max_batch_tokens / positions.max(1);
                let rows_alloc = r.max(alloc.0.saturating_mul(2)).min(most);
                if rows_alloc < r {
                    break; // it waits for room; those behind it wait too (first come, first served)
                }
                (rows_alloc, positions)
            };
            let padded = longest_prompt.max(p) * (picked.len() + 1);
            if !picked.is_empty() && padded > self.limits.max_prefill_tokens {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            picked.push(w);
            (rows, queries, longest, alloc) = (r, q, l, next_alloc);
            longest_prompt = longest_prompt.max(p);
        }
        if picked.is_empty() {
            return;
        }
        let ids: Vec<u64> = picked.iter().map(|w| w.request.id).collect();
        let first_new = self.running.len();
        if let Err(e) = guarded(|| self.join(picked, alloc)) {
            tracing::error!(error = %e, sequences = ids.len(), "a prefill failed");
            self.running.truncate(first_new);
            for id in ids {
                let e = DecodeError::Invalid(format!("the prompt's prefill failed: {e}"));
                events.push(Event::Finished { id, result: Err(e) });
            }
            if self.running.is_empty() {
                self.cache.release();
            }
            return;
        }
        self.steps_since_join = 0;
        let batch_size = self.running.len();
        for r in &mut self.running[first_new..] {
            r.batch_size = batch_size;
            events.push(Event::Joined { id: r.id, batch_size });
        }
    }

    /// Prefills the newcomers in one left-padded pass (padding is masked and position ids count real
    /// tokens only, so each prompt's keys and logits are what they are alone) and copies their keys into
    /// the batch's rows, past the padding.
    fn join(&mut self, picked: Vec<Waiting>, alloc: (usize, usize)) -> Result<()> {
        let model = self.ctx.model;
        let joined = Instant::now();
        let n = picked.len();
        let width = picked.iter().map(|w| w.request.prompt.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(n * width);
        let mut mask = Vec::with_capacity(n * width);
        let mut positions = Vec::with_capacity(n * width);
        for w in &picked {
            let prompt = &w.request.prompt;
            let pad = width - prompt.len();
            // Pad positions get token 0 and position 1 (transformers' choice; they are masked).
            ids.extend(std::iter::repeat_n(0, pad).chain(prompt.iter().copied()));
            mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, prompt.len())));
            positions.extend(std::iter::repeat_n(1, pad).chain(0..prompt.len() as i64));
        }
        let hidden = picked.iter().any(|w| w.machine.needs_hidden());
        let mut prefill = KvCache::new(model.info().n_layer);
        let out = model.forward(
            &i64_tensor(&ids, n, width, Device::Cpu)?,
            &i64_tensor(&mask, n, width, Device::Cpu)?,
            &i64_tensor(&positions, n, width, Device::Cpu)?,
            &mut prefill,
            Logits::LastOnly,
            hidden,
        )?;
        let logits = out.logits.f_select(1, -1)?.f_to_kind(Kind::Float)?;
        if alloc != (self.cache.rows(), self.cache.positions()) {
            let used = self.running.iter().map(|r| r.len).max().unwrap_or(0);
            self.cache
                .reserve(alloc.0, alloc.1, self.rows_used(), used, &prefill)?;
        }
        for (i, w) in picked.into_iter().enumerate() {
            let Waiting {
                request,
                arrived,
                mut machine,
                need,
            } = w;
            let p = request.prompt.len();
            let pad = width - p;
            if let Machine::Contrastive(c) = &mut machine {
                let h = out.hidden.as_ref().ok_or_else(|| {
                    DecodeError::Invalid("the model returned no hidden states for contrastive search".into())
                })?;
                c.start(
                    &h.f_select(0, i as i64)?.f_narrow(0, pad as i64, p as i64)?,
                    need + 1,
                )?;
            }
            let rows = machine.rows();
            let mine = logits.f_narrow(0, i as i64, 1)?;
            let mine = if rows > 1 {
                mine.f_expand([rows as i64, -1], false)?
            } else {
                mine
            };
            let row0 = self.rows_used();
            self.cache.load(row0, rows, &prefill, i, pad, p)?;
            self.running.push(Running {
                id: request.id,
                common: Common::new(&request.prompt, &request.plan, self.ctx.eos),
                machine,
                row0,
                len: p,
                need,
                logits: Some(mine),
                logits_row: None,
                arrived,
                joined,
                first_token: None,
                emitted: 0,
                batch_size: 0,
            });
        }
        Ok(())
    }

    /// One forward pass over every running row; contrastive rows pick their candidate. Returns the
    /// sequences that finished.
    fn forward(&mut self, feeds: &[Vec<i64>]) -> Result<Vec<(usize, Result<Decoded>)>> {
        let model = self.ctx.model;
        let s = self.rows_used();
        let q = self.queries();
        let keys = self.running.iter().map(|r| r.len).max().unwrap_or(0) + q;
        let mut ids = Vec::with_capacity(s * q);
        let mut positions = Vec::with_capacity(s * q);
        let mut starts = Vec::with_capacity(s);
        let mut visible = vec![false; s * q * keys];
        for (seq, feed) in self.running.iter().zip(feeds) {
            let (rows, queries, len) = (seq.machine.rows(), seq.machine.queries(), seq.len);
            for row in 0..rows {
                let r = seq.row0 + row;
                let mine = &feed[row * queries..(row + 1) * queries];
                for j in 0..q {
                    ids.push(*mine.get(j).or(mine.last()).unwrap_or(&0));
                    positions.push(len as i64);
                    let v = &mut visible[(r * q + j) * keys..][..keys];
                    v[..len].iter_mut().for_each(|x| *x = true);
                    // Each real query sees its own new key; contrastive candidates do not see each other.
                    // A padding query sees what the first one does (it only has to stay finite).
                    v[len + if j < queries { j } else { 0 }] = true;
                }
                starts.push(len);
            }
        }
        let visible = if s == 1 && q == 1 {
            None
        } else {
            let t = Tensor::from_slice(&visible.iter().map(|&b| b as u8).collect::<Vec<u8>>());
            Some(
                t.f_to_kind(Kind::Bool)?
                    .f_view([s as i64, q as i64, keys as i64])?,
            )
        };
        let step = SlotStep {
            ids: i64_tensor(&ids, s, q, Device::Cpu)?,
            positions: i64_tensor(&positions, s, q, Device::Cpu)?,
            starts,
            visible,
        };
        let contrastive = self.running.iter().any(|r| r.machine.needs_hidden());
        // With candidates in the pass, the head runs afterwards on the rows that need logits only.
        let late_head = q > 1 && model.separate_head();
        let mode = if late_head { Logits::None } else { Logits::All };
        let out = model.forward_slots(&step, &mut self.cache, mode, contrastive || late_head)?;
        let hidden = out
            .hidden
            .map(|h| {
                let e = h.size().last().copied().unwrap_or(0);
                h.f_reshape([(s * q) as i64, e])
            })
            .transpose()?;

        let mut done = Vec::new();
        let mut wanted: Vec<i64> = Vec::with_capacity(s);
        for i in 0..self.running.len() {
            let (ctx, cache, seq) = (&self.ctx, &mut self.cache, &mut self.running[i]);
            match &mut seq.machine {
                Machine::Contrastive(c) => {
                    let candidates = hidden
                        .as_ref()
                        .ok_or_else(|| {
                            DecodeError::Invalid("no hidden states for contrastive search".into())
                        })?
                        .f_narrow(0, (seq.row0 * q) as i64, c.top_k() as i64)?;
                    let absorbed = guarded(|| c.absorb(&mut seq.common, &candidates, ctx));
                    match absorbed {
                        Ok((chosen, finished)) => {
                            cache.move_position(seq.row0, seq.len + chosen, seq.len)?;
                            wanted.push((seq.row0 * q + chosen) as i64);
                            if let Some(d) = finished {
                                done.push((i, Ok(d)));
                            }
                        }
                        Err(e) => {
                            wanted.push((seq.row0 * q) as i64);
                            done.push((i, Err(e)));
                        }
                    }
                }
                m => wanted.extend((0..m.rows()).map(|b| ((seq.row0 + b) * q) as i64)),
            }
            seq.len += 1;
        }
        let wanted_t = Tensor::from_slice(&wanted);
        let logits = if late_head {
            let h = hidden.ok_or_else(|| DecodeError::Invalid("no hidden states for the head".into()))?;
            model.head(&h.f_index_select(0, &wanted_t.f_to_device(h.device())?)?)?
        } else {
            let v = out.logits.size().last().copied().unwrap_or(0);
            let flat = out.logits.f_reshape([(s * q) as i64, v])?;
            flat.f_index_select(0, &wanted_t.f_to_device(flat.device())?)?
        };
        let mut at = 0i64;
        for seq in &mut self.running {
            let n = seq.machine.rows() as i64;
            seq.logits = Some(logits.f_narrow(0, at, n)?);
            seq.logits_row = Some(at as usize);
            at += n;
        }
        self.step_logits = Some(logits);
        Ok(done)
    }

    /// Removes finished sequences (indices into `running`), reports them, and packs the rows.
    fn finish(&mut self, mut done: Vec<(usize, Result<Decoded>)>, events: &mut Vec<Event>) {
        if done.is_empty() {
            return;
        }
        done.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let now = Instant::now();
        for (i, result) in done {
            let seq = self.running.remove(i);
            let result = result.map(|decoded| {
                let first = seq.first_token.unwrap_or(now);
                FinishedSequence {
                    prompt_tokens: seq.common.prompt_len,
                    queued: seq.joined - seq.arrived,
                    time_to_first_token: first - seq.arrived,
                    inference: now - seq.joined,
                    batch_size: seq.batch_size,
                    decoded,
                }
            });
            events.push(Event::Finished { id: seq.id, result });
        }
        self.pack();
    }

    /// Moves every sequence's rows down to close the gaps left by those that left.
    fn pack(&mut self) {
        let mut cursor = 0;
        let mut failed = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            let rows = seq.machine.rows();
            if seq.row0 != cursor {
                if let Err(e) = self.cache.move_rows(seq.row0, cursor, rows, seq.len) {
                    failed.push((i, e));
                }
                seq.row0 = cursor;
            }
            cursor += rows;
        }
        for (i, e) in failed.into_iter().rev() {
            tracing::error!(error = %e, "packing the batch's cache failed; the sequence is dropped");
            self.running.remove(i);
        }
        if self.running.is_empty() {
            self.cache.release();
        }
    }

    fn report_tokens(&mut self, i: usize, events: &mut Vec<Event>) {
        let Some(seq) = self.running.get_mut(i) else {
            return;
        };
        if matches!(seq.machine, Machine::Beam(_)) {
            return;
        }
        let generated = seq.common.generated();
        if generated.len() > seq.emitted {
            seq.first_token.get_or_insert_with(Instant::now);
            events.push(Event::Tokens {
                id: seq.id,
                tokens: generated[seq.emitted..].to_vec(),
            });
            seq.emitted = generated.len();
        }
    }
}

/// One sequence's first half of a step (`argmax`: its row's argmax, computed for the whole batch).
fn choose(
    seq: &mut Running,
    cache: &mut SlotCache,
    argmax: Option<i64>,
    ctx: &Context<'_>,
) -> Result<Choice> {
    let logits = seq
        .logits
        .take()
        .ok_or_else(|| DecodeError::Invalid("a sequence has no logits to decode from".into()))?;
    let choice = match &mut seq.machine {
        Machine::Pick(p) => p.choose(&mut seq.common, &logits, argmax, ctx)?,
        Machine::Contrastive(c) => c.choose(&mut seq.common, &logits)?,
        Machine::Beam(b) => {
            let (choice, sources) = b.choose(&mut seq.common, &logits, ctx)?;
            if matches!(choice, Choice::Feed(_)) {
                cache.reorder(seq.row0, &sources, seq.len)?;
            }
            choice
        }
    };
    if matches!(choice, Choice::Done(_)) || !seq.common.generated().is_empty() {
        seq.first_token.get_or_insert_with(Instant::now);
    }
    Ok(choice)
}

/// Runs `f`, turning a panic (libtorch raises through `tch` as panics) into this sequence's error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic_message(&*panic);
        Err(DecodeError::Invalid(format!("the engine panicked: {what}")))
    })
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
