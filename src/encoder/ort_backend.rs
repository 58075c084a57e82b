//! ONNX Runtime inference backend (`ort`, loaded at run time from a libonnxruntime shared
//! library, e.g. the one in the PyPI `onnxruntime` wheel). The model is an ONNX encoder with
//! inputs input_ids, attention_mask (and optionally token_type_ids), output last_hidden_state
//! (B, T, H); pooling and normalization happen here, as in the candle backend.
//!
//! On the CPU, parallelism is across sequences, not inside operators: one single-threaded
//! session per thread, each encoding its share of a batch. Small per-operator work (layer
//! norms, GELU, softmax of one head) does not split well over threads; measured on 2 cores, two
//! single-threaded sessions encode about 5% more documents per second than one two-threaded.
//!
//! On a GPU it is one session on ONNX Runtime's CUDA execution provider, which the library
//! must have (the PyPI `onnxruntime-gpu` wheel's does; synthrank itself needs no CUDA build for
//! it). TF32 is off: f32 means f32, as in PyTorch's default.

use std::path::Path;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

use super::{DeviceChoice, Embedder, EncoderError, Pooling};
use crate::allocator::TensorWork;

/// ONNX Runtime allows one environment per process; it is created on first use.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, EncoderError> {
    ENVIRONMENT
        .get_or_init(|| {
            if !library.is_file() {
                return Err(format!(
                    "{}: no such file (set the stage's `onnxruntime` or ORT_DYLIB_PATH to libonnxruntime.so)",
                    library.display()
                ));
            }
            ort::init_from(library)
                .map_err(|e| format!("{}: {e}", library.display()))?
                .with_name("synthrank")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EncoderError::Onnx(e.clone()))
}

fn onnx_error(e: impl std::fmt::Display) -> EncoderError {
    EncoderError::Onnx(e.to_string())
}

pub struct OrtEmbedder {
    /// On the CPU one single-threaded session per worker thread; on a GPU one session.
    sessions: Vec<Session>,
    encoding: Encoding,
    device: String,
    /// Keeps freed tensor buffers cached for reuse while this exists.
    _tensor_work: TensorWork,
}

impl OrtEmbedder {
    /// Opens `model` (an .onnx file) with the ONNX Runtime library at `library` on `device`
    /// (`auto`: the GPU when the library has the CUDA provider and a GPU takes the session).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        library: &Path,
        model: &Path,
        dim: usize,
        pooling: Pooling,
        normalize: bool,
        pad_id: u32,
        threads: usize,
        device: DeviceChoice,
    ) -> Result<OrtEmbedder, EncoderError> {
        let env = environment(library)?;
        let cuda_built = ep::CUDA::is_available().map_err(onnx_error)?;
        let (sessions, device) = match device {
            DeviceChoice::Cpu => (cpu_sessions(env, model, threads)?, "cpu".to_string()),
            DeviceChoice::Cuda(n) if !cuda_built => {
                return Err(EncoderError::Device(format!(
                    "`cuda:{n}` asked of {}, which has no CUDA execution provider: point \
                     `onnxruntime` at the `onnxruntime-gpu` wheel's libonnxruntime.so",
                    library.display()
                )));
            }
            DeviceChoice::Cuda(n) => (vec![cuda_session(env, model, n)?], format!("cuda:{n}")),
            DeviceChoice::Auto => match cuda_built.then(|| cuda_session(env, model, 0)) {
                Some(Ok(session)) => (vec![session], "cuda:0".to_string()),
                Some(Err(e)) => {
                    tracing::debug!("ONNX Runtime's CUDA provider did not start ({e}): the CPU");
                    (cpu_sessions(env, model, threads)?, "cpu".to_string())
                }
                None => (cpu_sessions(env, model, threads)?, "cpu".to_string()),
            },
        };
        let token_types = sessions[0]
            .inputs()
            .iter()
            .any(|i| i.name() == "token_type_ids");
        Ok(OrtEmbedder {
            sessions,
            encoding: Encoding {
                dim,
                pooling,
                normalize,
                pad_id,
                token_types,
            },
            device,
            _tensor_work: TensorWork::begin(),
        })
    }

    /// Where the sessions run (`cpu`, `cuda:N`), for the manifest.
    pub fn device(&self) -> &str {
        &self.device
    }
}

fn builder(env: &Environment) -> Result<ort::session::builder::SessionBuilder, EncoderError> {
    Session::builder(env)
        .map_err(onnx_error)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(onnx_error)
}

fn commit(
    mut builder: ort::session::builder::SessionBuilder,
    model: &Path,
) -> Result<Session, EncoderError> {
    builder
        .commit_from_file(model)
        .map_err(|e| EncoderError::Onnx(format!("{}: {e}", model.display())))
}

fn cpu_sessions(
    env: &Environment,
    model: &Path,
    threads: usize,
) -> Result<Vec<Session>, EncoderError> {
    (0..threads.max(1))
        .map(|_| {
            commit(
                builder(env)?.with_intra_threads(1).map_err(onnx_error)?,
                model,
            )
        })
        .collect()
}

fn cuda_session(env: &Environment, model: &Path, device: usize) -> Result<Session, EncoderError> {
    let cuda = ep::CUDA::default()
        .with_device_id(device as i32)
        .with_tf32(false)
        .build()
        .error_on_failure();
    let builder = builder(env)?
        .with_execution_providers([cuda])
        .map_err(|e| EncoderError::Device(format!("ONNX Runtime's CUDA provider: {e}")))?;
    commit(builder, model)
}

impl Embedder for OrtEmbedder {
    fn dim(&self) -> usize {
        self.encoding.dim
    }

    fn embed(&mut self, batch: &[&[u32]]) -> Result<Vec<f32>, EncoderError> {
        let share = batch.len().div_ceil(self.sessions.len()).max(1);
        let encoding = self.encoding;
        let pooled = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .sessions
                .iter_mut()
                .zip(batch.chunks(share))
                .map(|(session, part)| scope.spawn(move || encoding.run(session, part)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("an ONNX Runtime worker panicked"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(pooled.concat())
    }
}

/// What one worker needs to encode and pool its share of a batch.
#[derive(Clone, Copy)]
struct Encoding {
    dim: usize,
    pooling: Pooling,
    normalize: bool,
    pad_id: u32,
    token_types: bool,
}

impl Encoding {
    fn run(self, session: &mut Session, batch: &[&[u32]]) -> Result<Vec<f32>, EncoderError> {
        let b = batch.len();
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for seq in batch {
            ids.extend(seq.iter().map(|&i| i64::from(i)));
            ids.extend(std::iter::repeat_n(i64::from(self.pad_id), t - seq.len()));
            mask.extend(std::iter::repeat_n(1i64, seq.len()));
            mask.extend(std::iter::repeat_n(0i64, t - seq.len()));
        }
        let shape = [b as i64, t as i64];
        let mut inputs = vec![
            (
                "input_ids",
                Tensor::from_array((shape, ids)).map_err(onnx_error)?,
            ),
            (
                "attention_mask",
                Tensor::from_array((shape, mask)).map_err(onnx_error)?,
            ),
        ];
        if self.token_types {
            inputs.push((
                "token_type_ids",
                Tensor::from_array((shape, vec![0i64; b * t])).map_err(onnx_error)?,
            ));
        }
        let outputs = session.run(inputs).map_err(onnx_error)?;
        let (out_shape, hidden) = outputs[0].try_extract_tensor::<f32>().map_err(onnx_error)?;
        let h = self.dim;
        if out_shape.len() != 3 || out_shape[2] as usize != h {
            return Err(EncoderError::Onnx(format!(
                "the model's first output has shape {out_shape:?}, expected (batch, tokens, {h})"
            )));
        }
        let mut pooled = vec![0f32; b * h];
        for (row, seq) in batch.iter().enumerate() {
            let out = &mut pooled[row * h..(row + 1) * h];
            let states = &hidden[row * t * h..(row + 1) * t * h];
            match self.pooling {
                Pooling::Cls => out.copy_from_slice(&states[..h]),
                Pooling::Mean => {
                    for token in states.chunks_exact(h).take(seq.len()) {
                        for (o, v) in out.iter_mut().zip(token) {
                            *o += v;
                        }
                    }
                    let n = seq.len().max(1) as f32;
                    out.iter_mut().for_each(|o| *o /= n);
                }
            }
            if self.normalize {
                let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                out.iter_mut().for_each(|o| *o /= norm);
            }
        }
        Ok(pooled)
    }
}
