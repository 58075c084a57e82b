//! Continuous batching for the embedded model: one thread owns the model and decodes every
//! admitted request together, a token per sequence per step; a request joins at the next step
//! and leaves the moment it ends, so the batch stays full while requests keep coming.

use std::sync::mpsc::{Receiver, TryRecvError};

use futures::channel::oneshot;
use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::llama::{Chunk, KvCache, Llama};
use super::sampler::Sampler;
use super::{ChatRequest, LlmError};

const DEFAULT_MAX_TOKENS: u32 = 512;
/// New tokens one step runs at most: prompts longer than what is left after the decoding
/// sequences are read over several steps, so a long prompt never stalls the others for long
/// and activations stay bounded.
const STEP_TOKENS: usize = 2048;

/// A request for the engine, and where its answer goes.
pub(super) struct Work {
    pub request: ChatRequest,
    pub prompt: String,
    pub reply: oneshot::Sender<Result<Completion, LlmError>>,
}

#[derive(Debug)]
pub(super) struct Completion {
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finish: &'static str,
}

pub(super) struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub eos: u32,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// The threads products run on; `None`: rayon's global pool.
    pub pool: Option<rayon::ThreadPool>,
}

struct Sequence {
    reply: oneshot::Sender<Result<Completion, LlmError>>,
    cache: KvCache,
    /// Tokens not yet run through the model: the prompt (or what is left of it), then the
    /// last token sampled.
    pending: Vec<u32>,
    prompt_tokens: usize,
    output: Vec<u32>,
    sampler: Sampler,
    max_new: usize,
    stop: Vec<String>,
}

impl Engine {
    /// Serves requests until the queue is closed and nothing is left to decode.
    pub fn serve(self, queue: &Receiver<Work>) {
        let mut active: Vec<Sequence> = Vec::new();
        loop {
            if active.is_empty() {
                match queue.recv() {
                    Ok(work) => self.admit(work, &mut active),
                    Err(_) => return,
                }
            }
            while active.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(work) => self.admit(work, &mut active),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            // A caller that gave up (a timeout, say) frees its slot.
            active.retain(|s| !s.reply.is_canceled());
            if active.is_empty() {
                continue;
            }
            let stepped = match &self.pool {
                Some(pool) => pool.install(|| self.step(&mut active)),
                None => self.step(&mut active),
            };
            if let Err(e) = stepped {
                for s in active.drain(..) {
                    let _ = s.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn admit(&self, work: Work, active: &mut Vec<Sequence>) {
        let request = &work.request;
        let prompt = match self.tokenizer.encode(work.prompt.as_str(), false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            Err(e) => {
                let _ = work
                    .reply
                    .send(Err(LlmError::Model(format!("tokenizing: {e}"))));
                return;
            }
        };
        let context = self.model.context();
        if prompt.len() + 1 >= context {
            let _ = work.reply.send(Err(LlmError::Model(format!(
                "the prompt has {} tokens, the model's context is {context}",
                prompt.len()
            ))));
            return;
        }
        let max_new = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize;
        if max_new == 0 {
            let _ = work.reply.send(Ok(Completion {
                text: String::new(),
                prompt_tokens: prompt.len() as u64,
                completion_tokens: 0,
                finish: "length",
            }));
            return;
        }
        active.push(Sequence {
            sampler: Sampler::new(request),
            max_new,
            stop: request.stop.clone(),
            cache: self.model.new_cache(),
            prompt_tokens: prompt.len(),
            pending: prompt,
            output: Vec::new(),
            reply: work.reply,
        });
    }

    /// One forward pass over every active sequence; the ones that end are answered and leave.
    /// Runs on the current rayon pool.
    fn step(&self, active: &mut Vec<Sequence>) -> Result<(), LlmError> {
        let mut budget = STEP_TOKENS;
        let mut takes = Vec::with_capacity(active.len());
        let mut chunks = Vec::with_capacity(active.len());
        for s in active.iter_mut() {
            let take = s.pending.len().min(budget);
            budget -= take;
            takes.push(take);
            if take > 0 {
                chunks.push(Chunk {
                    logits: take == s.pending.len(),
                    cache: &mut s.cache,
                    tokens: &s.pending[..take],
                });
            }
        }
        let logits = self.model.forward(&mut chunks);
        drop(chunks);
        let vocab = self.model.vocab();
        // Every sequence whose logits came back samples its next token (in parallel: nucleus
        // sampling sorts the whole vocabulary).
        let mut rows = logits.chunks_exact(vocab);
        let mut sampling: Vec<(usize, &mut Sequence, &[f32])> = Vec::new();
        for (i, (s, take)) in active.iter_mut().zip(takes).enumerate() {
            if take == 0 {
                continue;
            }
            let whole = take == s.pending.len();
            s.pending.drain(..take);
            if whole {
                let row = rows.next().expect("a row of logits per chunk that asked");
                sampling.push((i, s, row));
            }
        }
        let sampled = sampling
            .into_par_iter()
            .map(|(i, s, row)| Ok((i, s.sampler.sample(row)?)))
            .collect::<candle_core::Result<Vec<(usize, u32)>>>()
            .map_err(|e| LlmError::Model(e.to_string()))?;
        let mut finished = Vec::new();
        for (i, next) in sampled {
            if let Some(reason) = self.advance(&mut active[i], next) {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let s = active.swap_remove(i);
            let completion = self.finish(&s, reason);
            let _ = s.reply.send(completion);
        }
        Ok(())
    }

    /// Takes the sampled token; the finish reason when the sequence has ended.
    fn advance(&self, s: &mut Sequence, next: u32) -> Option<&'static str> {
        if next == self.eos {
            return Some("stop");
        }
        s.output.push(next);
        if !s.stop.is_empty() {
            let text = self.tokenizer.decode(&s.output, true).unwrap_or_default();
            if s.stop.iter().any(|stop| text.ends_with(stop.as_str())) {
                return Some("stop");
            }
        }
        if s.output.len() >= s.max_new || s.cache.len() + 1 >= self.model.context() {
            return Some("length");
        }
        s.pending.push(next);
        None
    }

    fn finish(&self, s: &Sequence, reason: &'static str) -> Result<Completion, LlmError> {
        let mut text = self
            .tokenizer
            .decode(&s.output, true)
            .map_err(|e| LlmError::Model(format!("decoding: {e}")))?;
        for stop in &s.stop {
            if let Some(cut) = text.find(stop.as_str()) {
                text.truncate(cut);
            }
        }
        Ok(Completion {
            text,
            prompt_tokens: s.prompt_tokens as u64,
            completion_tokens: s.output.len() as u64,
            finish: reason,
        })
    }
}
