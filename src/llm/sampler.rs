//! Next-token sampling for the embedded model: greedy, temperature, and nucleus (top-p), drawing
//! exactly what candle's `LogitsProcessor` draws for the same seed (the same probabilities,
//! the same kept tokens, the same random stream), without its sort of the whole vocabulary
//! for every token: the nucleus is found among the most likely tokens first.

use candle_core::{D, Device, Tensor};
use rand::SeedableRng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;

use super::ChatRequest;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Greedy,
    /// Every token, at its probability under the temperature.
    All {
        temperature: f64,
    },
    /// The most likely tokens up to probability mass `p`.
    Nucleus {
        p: f64,
        temperature: f64,
    },
}

pub(super) struct Sampler {
    rng: StdRng,
    mode: Mode,
}

impl Sampler {
    /// The request's sampling: greedy without a positive temperature; nucleus with a `top_p`
    /// below 1.
    pub fn new(request: &ChatRequest) -> Sampler {
        let mode = match request.temperature {
            Some(temperature) if temperature > 0.0 => match request.top_p {
                Some(p) if p < 1.0 => Mode::Nucleus { p, temperature },
                _ => Mode::All { temperature },
            },
            _ => Mode::Greedy,
        };
        Sampler {
            rng: StdRng::seed_from_u64(request.seed.unwrap_or(0)),
            mode,
        }
    }

    /// The next token after `logits` (one row, the vocabulary).
    pub fn sample(&mut self, logits: &[f32]) -> candle_core::Result<u32> {
        let logits = Tensor::from_slice(logits, logits.len(), &Device::Cpu)?;
        let (temperature, p) = match self.mode {
            Mode::Greedy => return logits.argmax(D::Minus1)?.to_scalar::<u32>(),
            Mode::All { temperature } => (temperature, None),
            Mode::Nucleus { p, temperature } => (temperature, Some(p)),
        };
        let mut probabilities: Vec<f32> =
            candle_nn::ops::softmax_last_dim(&(&logits / temperature)?)?.to_vec1()?;
        if let Some(p) = p
            && p > 0.0
        {
            keep_nucleus(&mut probabilities, p as f32);
        }
        let distribution = WeightedIndex::new(&probabilities).map_err(candle_core::Error::wrap)?;
        Ok(distribution.sample(&mut self.rng) as u32)
    }
}

/// Zeroes every probability outside the nucleus: in order of decreasing probability (ties in
/// token order), tokens are kept while the mass kept so far is below `p`. Candidates are the
/// 64 most likely tokens, then 8 times more, until the nucleus ends among them.
fn keep_nucleus(probabilities: &mut [f32], p: f32) {
    let n = probabilities.len();
    let order = |a: &u32, b: &u32| {
        let (pa, pb) = (probabilities[*a as usize], probabilities[*b as usize]);
        pb.total_cmp(&pa).then(a.cmp(b))
    };
    let mut candidates = 64.min(n);
    loop {
        let mut tokens: Vec<u32> = (0..n as u32).collect();
        if candidates < n {
            tokens.select_nth_unstable_by(candidates - 1, order);
            tokens.truncate(candidates);
        }
        tokens.sort_unstable_by(order);
        let mut mass = 0f32;
        let kept = tokens.iter().position(|&t| {
            let full = mass >= p;
            mass += probabilities[t as usize];
            full
        });
        match kept {
            Some(kept) => {
                let values: Vec<f32> = tokens[..kept]
                    .iter()
                    .map(|&t| probabilities[t as usize])
                    .collect();
                probabilities.fill(0.0);
                for (&t, v) in tokens[..kept].iter().zip(values) {
                    probabilities[t as usize] = v;
                }
                return;
            }
            None if candidates == n => return,
            None => candidates = (candidates * 8).min(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::generation::{LogitsProcessor, Sampling};

    fn request(temperature: Option<f64>, top_p: Option<f64>, seed: u64) -> ChatRequest {
        ChatRequest {
            temperature,
            top_p,
            seed: Some(seed),
            ..ChatRequest::default()
        }
    }

    /// A peaked distribution (a nucleus of a few tokens), a flat one (the nucleus reaches past
    /// the first candidates) and one with ties.
    fn logits(kind: usize, step: usize) -> Vec<f32> {
        (0..5000)
            .map(|i| {
                let h = ((i * 7919 + step * 104_729) % 1000) as f32 / 1000.0;
                match kind {
                    0 => h * 12.0,
                    1 => h * 0.5,
                    _ => (h * 4.0).round(),
                }
            })
            .collect()
    }

    #[test]
    fn draws_what_candles_logits_processor_draws() {
        let cases = [
            (
                Some(0.7),
                Some(0.9),
                Sampling::TopP {
                    p: 0.9,
                    temperature: 0.7,
                },
            ),
            (
                Some(1.3),
                Some(0.5),
                Sampling::TopP {
                    p: 0.5,
                    temperature: 1.3,
                },
            ),
            (Some(0.7), None, Sampling::All { temperature: 0.7 }),
            (None, Some(0.9), Sampling::ArgMax),
        ];
        for (temperature, top_p, sampling) in cases {
            for seed in [0, 7, 42] {
                let mut ours = Sampler::new(&request(temperature, top_p, seed));
                let mut candle = LogitsProcessor::from_sampling(seed, sampling.clone());
                for kind in 0..3 {
                    for step in 0..20 {
                        let values = logits(kind, step);
                        let row = Tensor::new(values.as_slice(), &Device::Cpu).unwrap();
                        assert_eq!(
                            ours.sample(&values).unwrap(),
                            candle.sample(&row).unwrap(),
                            "{sampling:?} seed {seed} kind {kind} step {step}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_nucleus_is_the_smallest_prefix_reaching_p() {
        let mut probabilities = vec![0.1, 0.4, 0.05, 0.3, 0.15];
        keep_nucleus(&mut probabilities, 0.75);
        assert_eq!(probabilities, vec![0.0, 0.4, 0.0, 0.3, 0.15]);
    }
}
