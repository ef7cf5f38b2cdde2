//! Continuous batching: the scheduler that owns the running batch on the engine thread.
//!
//! Iteration-level scheduling, as TGI's router and vLLM's scheduler do it. Before each decode step the
//! scheduler admits waiting sequences within two budgets, sequences (`max_batch_size`) and KV positions
//! allocated over the batch (`max_batch_tokens`); newcomers are prefilled together in one left-padded pass
//! and their keys copied into free rows of the batch's [`SlotCache`]. Then one forward pass advances every
//! sequence, whatever its strategy: greedy and sampling rows feed one token, a contrastive row feeds its
//! `top_k` candidates as queries of its own row, a beam search feeds one token per beam row. A pass whose
//! rows feed different numbers of tokens is packed ([`crate::lm::Packed`]): the model's projections and MLP
//! see only the real tokens, so a contrastive sequence costs its own candidates, not `top_k` queries for
//! every row of the batch.
//!
//! Built for a GPU, where a decode step of a 6B model is ~12 ms and anything that grows with the batch
//! around it would cost more than the model:
//! - **One readback a step for the picks.** Every greedy, sampling and contrastive row chooses in one batch
//!   selection ([`super::select`]): processors and warpers as batch operations with per-row parameters,
//!   sampling on the device. Contrastive rows then pick their candidate together (one more readback when
//!   any is in the batch); only beam search still decides per sequence.
//! - **O(1) leaves.** A sequence that finishes, fails or is cancelled leaves at once and the last rows
//!   fill its hole: one copy per device and per key/value, whatever the batch's size or the model's depth.
//! - **Bounded prefills.** A step prefills at most `max_prefill_tokens` prompt tokens; a longer prompt is
//!   prefilled a chunk a step while the batch decodes, so it delays running sequences by one bounded chunk
//!   a step, never by its whole prompt.
//!
//! Joins are rate-limited as TGI's `waiting_served_ratio` / `max_waiting_tokens` do: while a batch runs,
//! newcomers join when they are numerous enough against the running sequences, or when they have waited
//! `max_waiting_steps` steps, so constant arrivals cannot starve decoding with prefills. An empty batch
//! admits at once: a lone job never waits for company. Admission is first come, first served within a
//! lane, and interactive sequences wait ahead of batch ones (`shared::Lane`): a sequence that does not fit
//! now waits (those behind it wait too, so a big job is not starved by small ones), and one that can never
//! fit the budget is refused when it is submitted.
//!
//! Cost per step: the new tokens' keys are written in place; no step copies the cache. Joins copy the
//! newcomer's prefill (and, when the allocation must grow, the rows in use); beam search copies its own
//! rows when it reorders them.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use super::constraint::{self, Constraint};
use super::contrastive::{Contrastive, absorb};
use super::error::{DecodeError, Result, panic_message};
use super::finish::Decoded;
use super::machine::Machine;
use super::select::{Row, Selected, select};
use super::sequence::{Choice, Common, Context};
use super::stop::TextDecoder;
use super::tensors::{i64_tensor, to_vec_f32, to_vec_i64};
use crate::lm::{CausalLm, KvCache, Logits, Packed, SlotCache, SlotStep};
use shared::{GenerationPlan, Lane};
use tch::{Device, Kind, Tensor};

/// The scheduler's budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Sequences in the running batch at most.
    pub max_batch_size: usize,
    /// KV-cache positions allocated over the whole batch at most (rows × positions per row).
    pub max_batch_tokens: usize,
    pub join: JoinPolicy,
}

/// When waiting sequences join a running batch, and how much prompt a step prefills: the part of the
/// scheduler's budgets that the worker's settings hand over as they are (the sizes depend on the devices).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JoinPolicy {
    /// While a batch runs, waiting sequences join once they have waited this many steps...
    pub max_waiting_steps: usize,
    /// ... or once they are at least this share of the running sequences.
    pub waiting_served_ratio: f64,
    /// Prompt tokens a step prefills at most (TGI's `max_batch_prefill_tokens`): newcomers of one join
    /// round are prefilled together, left-padded, up to this many; a longer prompt is prefilled in chunks
    /// of this many tokens, one a step, while the batch decodes.
    pub max_prefill_tokens: usize,
    /// Whether batch-lane sequences pause while an interactive one runs: their keys leave the batch's rows
    /// (one copy) and come back (another) once no interactive sequence runs, and batch-lane newcomers
    /// wait meanwhile. Where a step's cost grows with its rows (a CPU), an interactive job then decodes as
    /// fast as alone; on a GPU, where a few more rows cost almost nothing, sharing the steps is better.
    pub pause_batch: bool,
}

impl Default for JoinPolicy {
    /// The worker's defaults: newcomers join at the next step, prefilling at most TGI's default a step.
    fn default() -> Self {
        Self {
            max_waiting_steps: 0,
            waiting_served_ratio: 0.3,
            max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS,
            pause_batch: false,
        }
    }
}

impl Limits {
    /// No budget but the model's context: offline generation of a known set of prompts.
    pub fn unbounded() -> Self {
        Self {
            max_batch_size: usize::MAX,
            max_batch_tokens: usize::MAX,
            join: JoinPolicy {
                max_waiting_steps: 0,
                waiting_served_ratio: 0.0,
                max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS,
                pause_batch: false,
            },
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
    /// The plan's grammar, compiled (off the engine thread); `None` without one.
    pub grammar: Option<Constraint>,
    /// The lane the job came from: interactive sequences wait ahead of batch ones.
    pub lane: Lane,
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
    /// The prompt's log-probabilities, when the plan asked for them.
    pub prompt_logprobs: Option<Vec<shared::TokenLogprob>>,
}

/// What a step reports.
#[derive(Debug)]
pub enum Event {
    /// The sequence joined the running batch (its prefill ran).
    Joined { id: u64, batch_size: usize },
    /// New tokens (greedy, sampling and contrastive search report them as they come; beam search only
    /// knows its tokens at the end), with their log-probabilities, one per token, when the sequence asked
    /// for them (the same entries its finished sequence's `logprobs` hold), so a stream can carry them.
    Tokens {
        id: u64,
        tokens: Vec<i64>,
        logprobs: Option<Vec<shared::TokenLogprob>>,
    },
    /// The sequence left the batch: done, or failed alone.
    Finished {
        id: u64,
        result: std::result::Result<FinishedSequence, DecodeError>,
    },
}

/// Where the last step's time went, and what it cost besides the forward pass: the engine's benchmark prints
/// the median of each.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepProfile {
    /// Admitting newcomers: their prefill pass and loading their keys into the batch's rows.
    pub prefill: Duration,
    /// Every sequence choosing its next feed: the batch token selection, beam and contrastive choices.
    pub select: Duration,
    /// The decode pass over every row (and contrastive search's pick of a candidate).
    pub forward: Duration,
    /// Closing the holes leavers made.
    pub maintenance: Duration,
    /// Cache copies made to keep rows in order ([`SlotCache::copies`]).
    pub cache_copies: usize,
    /// Whether a decode pass ran (a step may only admit, or find everyone done).
    pub decoded: bool,
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

impl Waiting {
    /// Whether its prefill must return the prompt's hidden states: contrastive search's context, or the
    /// prompt's log-probabilities.
    fn wants_hidden(&self) -> bool {
        self.machine.needs_hidden() || self.request.plan.prompt_logprobs.is_some()
    }
}

/// A prompt longer than a step's prefill budget, being prefilled a chunk a step.
struct Prefill {
    waiting: Waiting,
    /// Its keys so far, positions `0..done`.
    cache: KvCache,
    done: usize,
    /// Contrastive search's context: each chunk's hidden states.
    hidden: Vec<Tensor>,
}

/// A sequence whose prompt was prefilled, about to enter the batch.
struct Entering {
    waiting: Waiting,
    /// Its logits after the prompt, `[1, vocab]`.
    logits: Tensor,
    /// The prompt's hidden states `[prompt, n_embd]`, for contrastive search.
    hidden: Option<Tensor>,
    /// Where its keys are in the prefill cache: row, and left padding.
    row: usize,
    pad: usize,
}

struct Running {
    id: u64,
    lane: Lane,
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
    /// What it feeds the next pass: a token per row, or a contrastive row's candidates.
    feed: Vec<i64>,
    arrived: Instant,
    joined: Instant,
    first_token: Option<Instant>,
    emitted: usize,
    batch_size: usize,
}

/// A batch-lane sequence paused while interactive ones run ([`JoinPolicy::pause_batch`]): its state, and
/// its keys out of the batch's rows.
struct Paused {
    seq: Running,
    keys: KvCache,
}

/// The running batch and the queue in front of it.
pub struct Scheduler<'a> {
    ctx: Context<'a>,
    limits: Limits,
    cache: SlotCache,
    running: Vec<Running>,
    /// Paused sequences, oldest first: they resume in that order.
    paused: Vec<Paused>,
    waiting: VecDeque<Waiting>,
    steps_since_join: usize,
    /// The last decode pass's logits, every sequence's rows: greedy and sampling rows pick from it together
    /// (one host sync a step, not one a sequence).
    step_logits: Option<Tensor>,
    /// A long prompt being prefilled in chunks; nothing else joins meanwhile.
    prefilling: Option<Prefill>,
    profile: StepProfile,
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
            paused: Vec::new(),
            waiting: VecDeque::new(),
            steps_since_join: 0,
            step_logits: None,
            prefilling: None,
            profile: StepProfile::default(),
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
        let at = place_in_line(self.waiting.iter().map(|w| w.request.lane), request.lane);
        self.waiting.insert(
            at,
            Waiting {
                request,
                arrived: Instant::now(),
                machine,
                need: total - 1,
            },
        );
        Ok(())
    }

    /// Whether anything is running or waiting.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty()
            || !self.waiting.is_empty()
            || self.prefilling.is_some()
            || !self.paused.is_empty()
    }

    /// Removes a sequence, waiting or running; `false` when it is not here (finished, or never submitted).
    pub fn cancel(&mut self, id: u64) -> bool {
        if self
            .prefilling
            .as_ref()
            .is_some_and(|p| p.waiting.request.id == id)
        {
            self.prefilling = None;
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|w| w.request.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            self.running.remove(i);
            self.compact();
            return true;
        }
        if let Some(i) = self.paused.iter().position(|p| p.seq.id == id) {
            self.paused.remove(i);
            return true;
        }
        false
    }

    pub fn stats(&self) -> Stats {
        Stats {
            running: self.running.len() + self.paused.len(),
            waiting: self.waiting.len() + usize::from(self.prefilling.is_some()),
            rows: self.rows_used(),
            kv_used: self.running.iter().map(|r| r.machine.rows() * r.len).sum(),
            kv_allocated: self.cache.capacity(),
            max_batch_tokens: self.limits.max_batch_tokens,
        }
    }

    /// Where the last step's time went.
    pub fn profile(&self) -> StepProfile {
        self.profile
    }

    /// Admits what may join, then advances every running sequence by one step.
    pub fn step(&mut self) -> Vec<Event> {
        let copies = self.cache.copies();
        self.profile = StepProfile::default();
        let started = Instant::now();
        let events = self.step_inner();
        self.profile.forward = started
            .elapsed()
            .saturating_sub(self.profile.prefill + self.profile.select + self.profile.maintenance);
        self.profile.cache_copies = self.cache.copies() - copies;
        events
    }

    fn step_inner(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let admitting = Instant::now();
        self.admit(&mut events);
        self.pause_or_resume(&mut events);
        self.profile.prefill = admitting.elapsed();
        if self.running.is_empty() {
            return events;
        }
        self.steps_since_join += 1;
        let batch = self.running.len();
        for r in &mut self.running {
            r.batch_size = r.batch_size.max(batch);
        }

        // First half: every sequence decides what it feeds; greedy and sampling rows pick together.
        let selecting = Instant::now();
        let picked = self.select_picks();
        let mut done: Vec<(usize, Result<Decoded>)> = Vec::new();
        for (i, picked) in picked.into_iter().enumerate() {
            let (ctx, cache, seq) = (&self.ctx, &mut self.cache, &mut self.running[i]);
            match guarded(|| choose(seq, cache, picked, ctx)) {
                Ok(Choice::Feed(tokens)) => seq.feed = tokens,
                Ok(Choice::Done(d)) => done.push((i, Ok(d))),
                Err(e) => done.push((i, Err(e))),
            }
            self.report_tokens(i, &mut events);
        }
        self.profile.select = selecting.elapsed();
        // Leaving may reorder the others (a hole is filled with the last rows): each keeps its feed.
        self.finish(done, &mut events);
        if self.running.is_empty() {
            return events;
        }
        self.profile.decoded = true;

        // The forward pass over every row, then the second half.
        match self.forward_while_refreshing() {
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

    /// The next token of every greedy and sampling sequence and the candidates of every contrastive one, in
    /// one batch selection with one readback ([`super::select`]); `None` for beam search, which picks on
    /// its own. A failed selection cannot be pinned on one sequence: each of its sequences gets the error.
    fn select_picks(&mut self) -> Vec<Option<Result<Selected>>> {
        let step_logits = self.step_logits.take();
        let mut picked: Vec<Option<Result<Selected>>> = (0..self.running.len()).map(|_| None).collect();
        // Masks not computed during the last pass (newcomers, contrastive rows, which pick in the pass).
        let mut stale: Vec<(usize, &mut Constraint)> = self
            .running
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| !matches!(r.machine, Machine::Beam(_)))
            .filter_map(|(i, r)| {
                r.common
                    .grammar
                    .as_mut()
                    .filter(|g| g.mask().is_none())
                    .map(|g| (i, g))
            })
            .collect();
        if !stale.is_empty() {
            let mut refs: Vec<&mut Constraint> = stale.iter_mut().map(|(_, g)| &mut **g).collect();
            let results = Constraint::refresh_all(&mut refs);
            let indices: Vec<usize> = stale.iter().map(|(i, _)| *i).collect();
            for (i, result) in indices.into_iter().zip(results) {
                if let Err(e) = result {
                    picked[i] = Some(Err(e));
                }
            }
        }
        // Rows from the last decode pass first (one gather), then newcomers' rows from their prefill.
        let mut order: Vec<usize> = Vec::new();
        let mut step_rows: Vec<i64> = Vec::new();
        let mut joined: Vec<Tensor> = Vec::new();
        for pass in [true, false] {
            for (i, seq) in self.running.iter_mut().enumerate() {
                if matches!(seq.machine, Machine::Beam(_)) || picked[i].is_some() {
                    continue;
                }
                match (pass, seq.logits_row, step_logits.is_some()) {
                    (true, Some(r), true) => step_rows.push(r as i64),
                    (false, None, _) | (false, Some(_), false) => match seq.logits.take() {
                        Some(l) => joined.push(l),
                        None => continue,
                    },
                    _ => continue,
                }
                order.push(i);
            }
        }
        if order.is_empty() {
            return picked;
        }
        let result = guarded(|| {
            let mut parts = Vec::with_capacity(joined.len() + 1);
            if let Some(step) = step_logits.as_ref().filter(|_| !step_rows.is_empty()) {
                // The usual case, every row of the pass in order: a view, not a gather.
                let in_order = step_rows.iter().enumerate().all(|(i, &r)| r == i as i64);
                if in_order && step.size()[0] == step_rows.len() as i64 {
                    parts.push(step.shallow_clone());
                } else {
                    let rows = Tensor::f_from_slice(&step_rows)?.f_to_device(step.device())?;
                    parts.push(step.f_index_select(0, &rows)?);
                }
            }
            let device = parts.first().or(joined.first()).map(|t| t.device());
            for t in &joined {
                parts.push(match device {
                    Some(d) => t.f_to_device(d)?.f_to_kind(Kind::Float)?,
                    None => t.shallow_clone(),
                });
            }
            let logits = if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::f_cat(&parts, 0)?
            };
            // Each sequence's row, in `order`; the machines are borrowed apart from their sequences.
            let mut rows = Vec::with_capacity(order.len());
            let mut slots: Vec<Option<&mut Running>> = self.running.iter_mut().map(Some).collect();
            for &i in &order {
                let Some(seq) = slots[i].take() else { continue };
                let Running { machine, common, .. } = seq;
                match machine {
                    Machine::Pick(p) => rows.push(p.row(common)),
                    Machine::Contrastive(c) => rows.push(Row {
                        history: &common.tokens,
                        generated: common.generated().len(),
                        processors: &common.processors,
                        sample: None,
                        candidates: Some(c.top_k()),
                        mask: common.grammar.as_ref().and_then(|g| g.mask()),
                        logprobs: None,
                    }),
                    Machine::Beam(_) => {}
                }
            }
            select(&logits, &rows)
        });
        match result {
            Ok(selected) => {
                for (&i, t) in order.iter().zip(selected) {
                    picked[i] = Some(Ok(t));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, sequences = order.len(), "the batch's token selection failed");
                for &i in &order {
                    picked[i] = Some(Err(DecodeError::Invalid(format!(
                        "the batch's token selection failed: {e}"
                    ))));
                }
            }
        }
        picked
    }

    /// [`JoinPolicy::pause_batch`]: pauses every running batch-lane sequence while an interactive one runs,
    /// and otherwise resumes the paused ones, oldest first, as the budget has room.
    fn pause_or_resume(&mut self, events: &mut Vec<Event>) {
        if !self.limits.join.pause_batch {
            return;
        }
        if self.interactive_running() {
            let batch: Vec<usize> = (0..self.running.len())
                .filter(|&i| self.running[i].lane == Lane::Batch)
                .collect();
            if batch.is_empty() {
                return;
            }
            let started = Instant::now();
            for i in batch.into_iter().rev() {
                let mut seq = self.running.remove(i);
                // Its next choice reads the last pass's logits: it keeps its rows of them.
                if let (Some(row), Some(step)) = (seq.logits_row.take(), self.step_logits.as_ref())
                    && seq.logits.is_none()
                {
                    seq.logits = step.f_narrow(0, row as i64, seq.machine.rows() as i64).ok();
                }
                match self.cache.save_rows(seq.row0, seq.machine.rows(), seq.len) {
                    Ok(keys) => self.paused.push(Paused { seq, keys }),
                    Err(e) => fail_alone(events, seq.id, "pausing", &e),
                }
            }
            // Paused in reverse order of rows: the oldest first again.
            self.paused.sort_by_key(|p| p.seq.joined);
            self.compact();
            self.profile.maintenance += started.elapsed();
            return;
        }
        let started = Instant::now();
        while let Some(p) = self.paused.first() {
            let (rows, queries, need) = (p.seq.machine.rows(), p.seq.machine.queries(), p.seq.need);
            let Some(alloc) = self.allocation(rows, queries, need) else {
                break; // the budget has no room yet: it resumes when running sequences leave
            };
            let Paused { mut seq, keys } = self.paused.remove(0);
            let resumed = guarded(|| {
                self.grow(alloc, &keys)?;
                let row0 = self.rows_used();
                for b in 0..rows {
                    self.cache.load(row0 + b, 1, &keys, b, 0, seq.len)?;
                }
                Ok(row0)
            });
            match resumed {
                Ok(row0) => {
                    seq.row0 = row0;
                    self.running.push(seq);
                }
                Err(e) => fail_alone(events, seq.id, "resuming", &e),
            }
        }
        self.profile.maintenance += started.elapsed();
    }

    fn interactive_running(&self) -> bool {
        self.running.iter().any(|r| r.lane == Lane::Interactive)
    }

    /// Grows the allocation to `alloc` (rows, positions) when it differs, keeping the rows in use; `like`
    /// gives the layers' dtype, device and shape.
    fn grow(&mut self, alloc: (usize, usize), like: &KvCache) -> Result<()> {
        if alloc != (self.cache.rows(), self.cache.positions()) {
            let used = self.running.iter().map(|r| r.len).max().unwrap_or(0);
            self.cache
                .reserve(alloc.0, alloc.1, self.rows_used(), used, like)?;
        }
        Ok(())
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
        // A long prompt being prefilled takes this step's prefill budget: its next chunk, nothing else.
        if let Some(prefill) = self.prefilling.take() {
            self.advance_prefill(prefill, events);
            return;
        }
        if self.waiting.is_empty() {
            return;
        }
        if !self.running.is_empty() {
            let many = self.waiting.len() as f64
                >= self.limits.join.waiting_served_ratio * self.running.len() as f64;
            if !many && self.steps_since_join < self.limits.join.max_waiting_steps {
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
        let interactive = self.interactive_running();
        while let Some(w) = self.waiting.front() {
            if self.running.len() + self.paused.len() + picked.len() >= self.limits.max_batch_size {
                break;
            }
            // Batch-lane newcomers wait while batch sequences are paused (they would be paused at once, or
            // take the room the paused ones come back to). Interactive ones wait ahead of them in line.
            if self.limits.join.pause_batch
                && w.request.lane == Lane::Batch
                && (interactive
                    || !self.paused.is_empty()
                    || picked.iter().any(|p| p.request.lane == Lane::Interactive))
            {
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
            if p > self.limits.join.max_prefill_tokens {
                // Longer than a step's prefill budget: prefilled a chunk a step while the batch decodes,
                // once it is first in line (it joins alone).
                if picked.is_empty()
                    && let Some(w) = self.waiting.pop_front()
                {
                    let prefill = Prefill {
                        waiting: w,
                        cache: KvCache::new(self.ctx.model.info().n_layer),
                        done: 0,
                        hidden: Vec::new(),
                    };
                    self.advance_prefill(prefill, events);
                    return;
                }
                break;
            }
            let padded = longest_prompt.max(p) * (picked.len() + 1);
            if !picked.is_empty() && padded > self.limits.join.max_prefill_tokens {
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
        let hidden = picked.iter().any(Waiting::wants_hidden);
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
        let entering = picked
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let pad = width - w.request.prompt.len();
                let hidden = match &out.hidden {
                    Some(h) if w.wants_hidden() => Some(h.f_select(0, i as i64)?.f_narrow(
                        0,
                        pad as i64,
                        w.request.prompt.len() as i64,
                    )?),
                    _ => None,
                };
                Ok(Entering {
                    logits: logits.f_narrow(0, i as i64, 1)?,
                    hidden,
                    row: i,
                    pad,
                    waiting: w,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.enter(entering, &prefill, alloc, joined)
    }

    /// Runs the next chunk of a long prompt's prefill (at most `max_prefill_tokens` tokens); after its last
    /// chunk the sequence enters the batch. Running sequences decode in the same step, so a long prompt
    /// delays them by one bounded chunk a step, never by its whole prefill.
    fn advance_prefill(&mut self, mut p: Prefill, events: &mut Vec<Event>) {
        let id = p.waiting.request.id;
        let chunk = guarded(|| self.prefill_chunk(&mut p));
        let entered = match chunk {
            Ok(None) => {
                self.prefilling = Some(p);
                return;
            }
            Ok(Some((logits, hidden))) => {
                // Nothing joined while it was prefilled, and leaving only frees room: it fits, unless the
                // budget changed under it.
                let (rows, queries) = (p.waiting.machine.rows(), p.waiting.machine.queries());
                match self.allocation(rows, queries, p.waiting.need) {
                    Some(alloc) => {
                        let entering = Entering {
                            waiting: p.waiting,
                            logits,
                            hidden,
                            row: 0,
                            pad: 0,
                        };
                        let cache = p.cache;
                        guarded(|| self.enter(vec![entering], &cache, alloc, Instant::now()))
                    }
                    None => Err(DecodeError::TooLarge(
                        "the batch has no room left for the prompt it prefilled".into(),
                    )),
                }
            }
            Err(e) => Err(e),
        };
        match entered {
            Ok(()) => {
                self.steps_since_join = 0;
                let batch_size = self.running.len();
                if let Some(r) = self.running.last_mut() {
                    r.batch_size = batch_size;
                }
                events.push(Event::Joined { id, batch_size });
            }
            Err(e) => {
                tracing::error!(error = %e, "a chunked prefill failed");
                self.running.retain(|r| r.id != id);
                let e = DecodeError::Invalid(format!("the prompt's prefill failed: {e}"));
                events.push(Event::Finished { id, result: Err(e) });
                if self.running.is_empty() {
                    self.cache.release();
                }
            }
        }
    }

    /// One chunk of a long prompt into its prefill cache; after the last, the prompt's logits `[1, vocab]`
    /// and (for contrastive search) its hidden states.
    fn prefill_chunk(&self, p: &mut Prefill) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let prompt = &p.waiting.request.prompt;
        let chunk = self
            .limits
            .join
            .max_prefill_tokens
            .max(1)
            .min(prompt.len() - p.done);
        let (from, to) = (p.done, p.done + chunk);
        let out = self.ctx.model.forward(
            &i64_tensor(&prompt[from..to], 1, chunk, Device::Cpu)?,
            &i64_tensor(&vec![1; to], 1, to, Device::Cpu)?,
            &i64_tensor(
                &(from as i64..to as i64).collect::<Vec<_>>(),
                1,
                chunk,
                Device::Cpu,
            )?,
            &mut p.cache,
            Logits::LastOnly,
            p.waiting.wants_hidden(),
        )?;
        if let Some(h) = out.hidden {
            p.hidden.push(h.f_select(0, 0)?);
        }
        p.done = to;
        if to < prompt.len() {
            return Ok(None);
        }
        let hidden = match p.hidden.len() {
            0 => None,
            _ => Some(Tensor::f_cat(&p.hidden, 0)?),
        };
        Ok(Some((
            out.logits.f_select(1, -1)?.f_to_kind(Kind::Float)?,
            hidden,
        )))
    }

    /// The allocation `(rows, positions)` the batch needs with one more sequence of `rows` rows, `queries`
    /// queries and `need` positions; `None` when the budget cannot hold it.
    fn allocation(&self, rows: usize, queries: usize, need: usize) -> Option<(usize, usize)> {
        let alloc = (self.cache.rows(), self.cache.positions());
        let r = self.rows_used() + rows;
        let positions =
            self.running.iter().map(|s| s.need).max().unwrap_or(0).max(need) + self.queries().max(queries);
        if r <= alloc.0 && positions <= alloc.1 {
            return Some(alloc);
        }
        let positions = positions.max(alloc.1);
        let most = self.limits.max_batch_tokens / positions.max(1);
        let rows_alloc = r.max(alloc.0.saturating_mul(2)).min(most);
        (rows_alloc >= r).then_some((rows_alloc, positions))
    }

    /// Newcomers whose prompts `prefill` holds enter the batch: the allocation grows to `alloc` if it must,
    /// their keys are copied into free rows, and each gets its prefill's logits for its first choice.
    fn enter(
        &mut self,
        entering: Vec<Entering>,
        prefill: &KvCache,
        alloc: (usize, usize),
        joined: Instant,
    ) -> Result<()> {
        self.grow(alloc, prefill)?;
        for e in entering {
            let Waiting {
                request,
                arrived,
                mut machine,
                need,
            } = e.waiting;
            let p = request.prompt.len();
            if let Machine::Contrastive(c) = &mut machine {
                let h = e.hidden.as_ref().ok_or_else(|| {
                    DecodeError::Invalid("the model returned no hidden states for contrastive search".into())
                })?;
                c.start(h, need + 1)?;
            }
            let rows = machine.rows();
            let mine = if rows > 1 {
                e.logits.f_expand([rows as i64, -1], false)?
            } else {
                e.logits
            };
            let mut common = Common::new(&request.prompt, &request.plan, self.ctx.eos, request.grammar);
            if let Some(alternatives) = request.plan.prompt_logprobs {
                let h = e.hidden.as_ref().ok_or_else(|| {
                    DecodeError::Invalid("the model returned no hidden states to score the prompt".into())
                })?;
                common.prompt_logprobs =
                    Some(score_prompt(self.ctx.model, h, &request.prompt, alternatives)?);
            }
            let row0 = self.rows_used();
            self.cache.load(row0, rows, prefill, e.row, e.pad, p)?;
            self.running.push(Running {
                id: request.id,
                lane: request.lane,
                common,
                machine,
                row0,
                len: p,
                need,
                logits: Some(mine),
                logits_row: None,
                feed: Vec::new(),
                arrived,
                joined,
                first_token: None,
                emitted: 0,
                batch_size: 0,
            });
        }
        Ok(())
    }

    /// The forward pass, while another thread computes the grammar masks of every constrained sequence whose
    /// token is already chosen (all but contrastive search's, chosen in the pass): on a GPU the masks cost
    /// no step time. A sequence whose grammar fails leaves with the error.
    fn forward_while_refreshing(&mut self) -> Result<Vec<(usize, Result<Decoded>)>> {
        let mut taken: Vec<(usize, Constraint)> = self
            .running
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| matches!(r.machine, Machine::Pick(_)))
            .filter_map(|(i, r)| r.common.grammar.take().map(|g| (i, g)))
            .collect();
        if taken.is_empty() {
            return guarded(|| self.forward());
        }
        let owed = taken.len();
        let (forwarded, refreshed) = std::thread::scope(|s| {
            let masks = s.spawn(|| {
                let mut refs: Vec<&mut Constraint> = taken.iter_mut().map(|(_, g)| g).collect();
                Constraint::refresh_all(&mut refs)
            });
            let forwarded = guarded(|| self.forward());
            let refreshed = masks
                .join()
                .unwrap_or_else(|_| constraint::lost(owed, "the grammar masks' thread panicked"));
            (forwarded, refreshed)
        });
        let mut done = forwarded?;
        for ((i, g), result) in taken.into_iter().zip(refreshed) {
            self.running[i].common.grammar = Some(g);
            if let Err(e) = result
                && !done.iter().any(|(j, _)| *j == i)
            {
                done.push((i, Err(e)));
            }
        }
        done.sort_by_key(|(i, _)| *i);
        Ok(done)
    }

    /// One forward pass over every running row; contrastive rows pick their candidate. Returns the
    /// sequences that finished.
    fn forward(&mut self) -> Result<Vec<(usize, Result<Decoded>)>> {
        let model = self.ctx.model;
        let s = self.rows_used();
        let q = self.queries();
        let keys = self.running.iter().map(|r| r.len).max().unwrap_or(0) + q;
        // Rows feeding fewer tokens than the widest (one beside a contrastive row's candidates) are packed:
        // only real tokens run through the model, so one contrastive sequence does not widen every row.
        let per_row: Vec<usize> = self
            .running
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.machine.queries(), r.machine.rows()))
            .collect();
        let packed = Packed::of(&per_row);
        let mut ids = Vec::with_capacity(s * q);
        let mut positions = Vec::with_capacity(s * q);
        let mut starts = Vec::with_capacity(s);
        let mut visible = vec![false; s * q * keys];
        for seq in &self.running {
            let feed = &seq.feed;
            let (rows, queries, len) = (seq.machine.rows(), seq.machine.queries(), seq.len);
            for row in 0..rows {
                let r = seq.row0 + row;
                let mine = &feed[row * queries..(row + 1) * queries];
                // A packed step feeds the real tokens only; a grid step pads a row with its last one.
                let fed = if packed.is_some() { queries } else { q };
                for j in 0..fed {
                    ids.push(*mine.get(j).or(mine.last()).unwrap_or(&0));
                    positions.push(len as i64);
                }
                for j in 0..q {
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
        let (b, t) = if packed.is_some() { (1, ids.len()) } else { (s, q) };
        let step = SlotStep {
            ids: i64_tensor(&ids, b, t, Device::Cpu)?,
            positions: i64_tensor(&positions, b, t, Device::Cpu)?,
            starts,
            visible,
            packed,
        };
        let contrastive = self.running.iter().any(|r| r.machine.needs_hidden());
        // With candidates in the pass, the head runs afterwards on the rows that need logits only.
        let late_head = q > 1 && model.separate_head();
        let mode = if late_head { Logits::None } else { Logits::All };
        let out = model.forward_slots(&step, &mut self.cache, mode, contrastive || late_head)?;
        // Outputs per token, `[S * Q]` or a packed step's `[T]`; `step.output_index` finds a row's.
        let hidden = out
            .hidden
            .map(|h| {
                let e = h.size().last().copied().unwrap_or(0);
                h.f_reshape([-1, e])
            })
            .transpose()?;

        // Contrastive rows pick their candidates together: one similarity, one readback.
        let mut done = Vec::new();
        let mut chosen: Vec<Option<usize>> = vec![None; self.running.len()];
        let contrastive: Vec<usize> = (0..self.running.len())
            .filter(|&i| matches!(self.running[i].machine, Machine::Contrastive(_)))
            .collect();
        if !contrastive.is_empty() {
            let hidden = hidden
                .as_ref()
                .ok_or_else(|| DecodeError::Invalid("no hidden states for contrastive search".into()))?;
            let kmax = contrastive
                .iter()
                .map(|&i| self.running[i].machine.queries())
                .max()
                .unwrap_or(1);
            let mut rows = Vec::with_capacity(contrastive.len() * kmax);
            for &i in &contrastive {
                let (row0, k) = (self.running[i].row0, self.running[i].machine.queries());
                rows.extend((0..kmax).map(|j| step.output_index(row0, j.min(k - 1)) as i64));
            }
            let rows = Tensor::f_from_slice(&rows)?.f_to_device(hidden.device())?;
            let candidates =
                hidden
                    .f_index_select(0, &rows)?
                    .f_view([contrastive.len() as i64, kmax as i64, -1])?;
            let ctx = &self.ctx;
            let mut seqs: Vec<(&mut Contrastive, &mut Common)> = self
                .running
                .iter_mut()
                .filter_map(|r| match &mut r.machine {
                    Machine::Contrastive(c) => Some((c, &mut r.common)),
                    _ => None,
                })
                .collect();
            match guarded(|| absorb(&mut seqs, &candidates, ctx)) {
                Ok(picks) => {
                    let mut keeps = Vec::with_capacity(picks.len());
                    for (&i, (pick, finished)) in contrastive.iter().zip(picks) {
                        let seq = &self.running[i];
                        keeps.push((seq.row0, seq.len + pick, seq.len));
                        chosen[i] = Some(pick);
                        if let Some(d) = finished {
                            done.push((i, Ok(d)));
                        }
                    }
                    self.cache.keep_positions(&keeps)?;
                }
                Err(e) => {
                    tracing::error!(error = %e, sequences = contrastive.len(), "contrastive search's pick failed");
                    for &i in &contrastive {
                        done.push((
                            i,
                            Err(DecodeError::Invalid(format!(
                                "contrastive search's pick failed: {e}"
                            ))),
                        ));
                    }
                }
            }
        }
        let mut wanted: Vec<i64> = Vec::with_capacity(s);
        for (i, seq) in self.running.iter_mut().enumerate() {
            match &seq.machine {
                Machine::Contrastive(_) => {
                    wanted.push(step.output_index(seq.row0, chosen[i].unwrap_or(0)) as i64)
                }
                m => wanted.extend((0..m.rows()).map(|b| step.output_index(seq.row0 + b, 0) as i64)),
            }
            seq.len += 1;
        }
        done.sort_by_key(|(i, _)| *i);
        let wanted_t = Tensor::from_slice(&wanted);
        let logits = if late_head {
            let h = hidden.ok_or_else(|| DecodeError::Invalid("no hidden states for the head".into()))?;
            model.head(&h.f_index_select(0, &wanted_t.f_to_device(h.device())?)?)?
        } else {
            let v = out.logits.size().last().copied().unwrap_or(0);
            let flat = out.logits.f_reshape([-1, v])?;
            if q == 1 {
                // One query a row: every row's logits, in order, are wanted as they are.
                flat
            } else {
                flat.f_index_select(0, &wanted_t.f_to_device(flat.device())?)?
            }
        };
        let mut at = 0i64;
        for seq in &mut self.running {
            let n = seq.machine.rows() as i64;
            // Greedy, sampling and contrastive rows are read from `step_logits` by the batch selection.
            seq.logits = match seq.machine {
                Machine::Beam(_) => Some(logits.f_narrow(0, at, n)?),
                _ => None,
            };
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
            let mut seq = self.running.remove(i);
            let prompt_logprobs = seq.common.prompt_logprobs.take();
            let result = result.map(|decoded| {
                let first = seq.first_token.unwrap_or(now);
                FinishedSequence {
                    prompt_tokens: seq.common.prompt_len,
                    queued: seq.joined - seq.arrived,
                    time_to_first_token: first - seq.arrived,
                    inference: now - seq.joined,
                    batch_size: seq.batch_size,
                    prompt_logprobs,
                    decoded,
                }
            });
            events.push(Event::Finished { id: seq.id, result });
        }
        self.compact();
    }

    /// Closes the holes that leavers made, so the rows in use are `0..n` again: each sequence lying past
    /// the rows still needed moves into a hole (one copy per device, [`SlotCache::move_rows`]), the others
    /// stay where they are. A leave costs O(1) moves, not a shift of every later sequence. Only when the
    /// holes are too fragmented for a sequence of several rows (beams) does the batch pack in order.
    fn compact(&mut self) {
        let started = Instant::now();
        self.compact_rows();
        self.profile.maintenance += started.elapsed();
    }

    fn compact_rows(&mut self) {
        let spans: Vec<(usize, usize)> = self.running.iter().map(|r| (r.row0, r.machine.rows())).collect();
        let moves = plan_moves(&spans).unwrap_or_else(|| pack_moves(&spans));
        let mut failed = Vec::new();
        for (i, to) in moves {
            let seq = &mut self.running[i];
            if let Err(e) = self.cache.move_rows(seq.row0, to, seq.machine.rows(), seq.len) {
                failed.push(i);
                tracing::error!(error = %e, "moving a sequence's cache rows failed; the sequence is dropped");
            }
            seq.row0 = to;
        }
        for i in failed.into_iter().rev() {
            self.running.remove(i);
        }
        // The running order is the rows' order: a step feeds row r from the r-th sequence's rows.
        self.running.sort_by_key(|r| r.row0);
        if self.running.is_empty() {
            self.cache.release();
        } else if self.running.iter().map(|r| r.row0 + r.machine.rows()).max() != Some(self.rows_used()) {
            // A dropped sequence left a hole of its own.
            self.compact_rows();
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
            // A sequence that asks for log-probabilities records one per generated token
            // (`Pick::take`), so the new ones start where the new tokens do.
            let logprobs = seq.common.logprobs.map(|_| {
                seq.common
                    .token_logprobs
                    .get(seq.emitted..)
                    .unwrap_or_default()
                    .to_vec()
            });
            events.push(Event::Tokens {
                id: seq.id,
                tokens: generated[seq.emitted..].to_vec(),
                logprobs,
            });
            seq.emitted = generated.len();
        }
    }
}

/// Ends sequence `id` with the error of an operation on its cache rows (`what`: "pausing", "resuming"): it
/// fails alone, the others go on.
fn fail_alone(events: &mut Vec<Event>, id: u64, what: &str, e: &dyn std::fmt::Display) {
    tracing::error!(error = %e, "{what} a sequence failed");
    let e = DecodeError::Invalid(format!("{what} the sequence failed: {e}"));
    events.push(Event::Finished { id, result: Err(e) });
}

/// Each prompt token's log-probability given the tokens before it (the first's is `None`) and its
/// `alternatives` likeliest tokens: the prompt's hidden states `[prompt, n_embd]` through the model's head
/// and a log-softmax, a slice of positions at a time (a 2,048-token prompt's logits would take 400 MB at
/// once). Raw log-probabilities, as for generated tokens.
fn score_prompt(
    model: &dyn CausalLm,
    hidden: &Tensor,
    prompt: &[i64],
    alternatives: usize,
) -> Result<Vec<shared::TokenLogprob>> {
    const SLICE: usize = 256;
    let mut out = Vec::with_capacity(prompt.len());
    if let Some(&first) = prompt.first() {
        out.push(shared::TokenLogprob {
            id: first as u32,
            logprob: None,
            top: Vec::new(),
        });
    }
    let mut at = 0;
    while at + 1 < prompt.len() {
        let n = SLICE.min(prompt.len() - 1 - at);
        let log_probs = model
            .head(&hidden.f_narrow(0, at as i64, n as i64)?)?
            .f_to_kind(Kind::Float)?
            .f_log_softmax(-1, Kind::Float)?;
        let next = &prompt[at + 1..at + 1 + n];
        let ids = i64_tensor(next, n, 1, log_probs.device())?;
        let mut floats = vec![log_probs.f_gather(1, &ids, false)?.f_reshape([-1])?];
        let mut top_ids = Vec::new();
        if alternatives > 0 {
            let (values, ids) = log_probs.f_topk(alternatives as i64, -1, true, true)?;
            floats.push(values.f_reshape([-1])?);
            top_ids = to_vec_i64(&ids)?;
        }
        let floats = to_vec_f32(&Tensor::f_cat(&floats, 0)?)?;
        let (picked, values) = floats.split_at(n);
        for (j, &id) in next.iter().enumerate() {
            let top = (0..alternatives)
                .map(|k| shared::TopLogprob {
                    id: top_ids[j * alternatives + k] as u32,
                    logprob: values[j * alternatives + k],
                })
                .collect();
            out.push(shared::TokenLogprob {
                id: id as u32,
                logprob: Some(picked[j]),
                top,
            });
        }
        at += n;
    }
    Ok(out)
}

/// One sequence's first half of a step (`picked`: its token from the batch selection, for greedy and
/// sampling sequences).
fn choose(
    seq: &mut Running,
    cache: &mut SlotCache,
    picked: Option<Result<Selected>>,
    ctx: &Context<'_>,
) -> Result<Choice> {
    let no_logits = || DecodeError::Invalid("a sequence has no logits to decode from".into());
    if seq.common.max_new_tokens == 0 {
        // Only its prompt was wanted (scored in its prefill).
        return Ok(Choice::Done(Decoded {
            tokens: Vec::new(),
            finish_reason: shared::FinishReason::Length,
            stop: None,
            logprobs: seq.common.logprobs.map(|_| Vec::new()),
        }));
    }
    let choice = match (&mut seq.machine, picked.transpose()?) {
        (Machine::Pick(p), Some(Selected::Token(next, logprob))) => {
            p.take(&mut seq.common, next, logprob, ctx)?
        }
        (Machine::Contrastive(c), Some(Selected::Candidates(ids, probs))) => c.propose(ids, probs),
        (Machine::Pick(_) | Machine::Contrastive(_), _) => return Err(no_logits()),
        (Machine::Beam(b), _) => {
            let logits = seq.logits.take().ok_or_else(no_logits)?;
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

/// The moves `(sequence, new first row)` that fill the holes below the rows in use with the sequences
/// lying past them, first fit; `None` when a sequence finds no hole wide enough. `spans` are the remaining
/// sequences' `(first row, rows)`.
fn plan_moves(spans: &[(usize, usize)]) -> Option<Vec<(usize, usize)>> {
    let total: usize = spans.iter().map(|&(_, rows)| rows).sum();
    let mut free = vec![true; total];
    for &(row0, rows) in spans {
        free[row0.min(total)..(row0 + rows).min(total)].fill(false);
    }
    let mut moves = Vec::new();
    for (i, &(row0, rows)) in spans.iter().enumerate() {
        if row0 + rows <= total {
            continue;
        }
        let to = (0..=total.checked_sub(rows)?).find(|&at| free[at..at + rows].iter().all(|&f| f))?;
        free[to..to + rows].iter_mut().for_each(|f| *f = false);
        moves.push((i, to));
    }
    Some(moves)
}

/// The moves that pack every sequence down in row order (a source never overlaps a later destination).
fn pack_moves(spans: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].0);
    let mut cursor = 0;
    let mut moves = Vec::new();
    for i in order {
        if spans[i].0 != cursor {
            moves.push((i, cursor));
        }
        cursor += spans[i].1;
    }
    moves
}

/// Where a sequence of `lane` joins the waiting line whose lanes are `line`, in order: behind every
/// sequence of its lane or a higher one, ahead of every sequence of a lower one (first come, first served
/// within a lane).
fn place_in_line(line: impl Iterator<Item = Lane>, lane: Lane) -> usize {
    let mut at = 0;
    for (i, waiting) in line.enumerate() {
        if waiting >= lane {
            at = i + 1;
        }
    }
    at
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
