//! Five AdamW steps of all-MiniLM-L6-v2 reproduce PyTorch (../shared/golden/train_steps.json)
//! for the Wasserstein and InfoNCE losses, and a run resumed from a checkpoint is bit-for-bit the
//! uninterrupted run.

mod common;

use candle_core::{DType, Device};
use synthrank::encoder::{
    Bert, BertConfig, CandleEmbedder, Embedder, ModelDir, Pooling, Precision,
};
use synthrank::loss::LossKind;
use synthrank::train::{AdamWConfig, Decay, Schedule, TrainConfig, TrainGroup, Trainer, Warmup};

fn config(loss: LossKind, lr: f64, dropout: bool, total_steps: u64) -> TrainConfig {
    TrainConfig {
        loss,
        temperature: 1.0,
        in_batch_negatives: true,
        pooling: Pooling::Mean,
        normalize: false,
        dropout,
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        schedule: Schedule {
            lr,
            warmup: Warmup::Linear,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps,
        },
        max_grad_norm: None,
        seed: 11,
        chunk_size: None,
    }
}

/// The golden batch of ../shared/golden/train_steps.json, tokenized.
struct GoldenSteps {
    golden: serde_json::Value,
    dir: ModelDir,
    tokenizer: synthrank::encoder::TextTokenizer,
    groups: Vec<TrainGroup>,
    max_len: usize,
    lr: f64,
}

fn golden_steps() -> GoldenSteps {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::shared().join("golden/train_steps.json")).unwrap(),
    )
    .unwrap();
    let dir = ModelDir::open(&common::demo_model("all-MiniLM-L6-v2")).unwrap();
    let mut tokenizer = dir.tokenizer().unwrap();
    let max_len = golden["max_length"].as_u64().unwrap() as usize;
    let mut groups = Vec::new();
    for item in golden["batch"].as_array().unwrap() {
        let query = item["query"].as_str().unwrap();
        let passages: Vec<&str> = item["passages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        groups.push(TrainGroup {
            query: tokenizer.encode_batch(&[query], max_len).unwrap().remove(0),
            passages: tokenizer.encode_batch(&passages, max_len).unwrap(),
            labels: item["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect(),
        });
    }
    let lr = golden["lr"].as_f64().unwrap();
    GoldenSteps {
        golden,
        dir,
        tokenizer,
        groups,
        max_len,
        lr,
    }
}

/// bf16 matrix products (f32 master weights and loss) follow PyTorch's f32 losses closely.
#[test]
fn bf16_steps_track_pytorch_f32() {
    let GoldenSteps {
        golden,
        dir,
        tokenizer,
        groups,
        lr,
        ..
    } = golden_steps();
    let model = dir
        .load_model(&Device::Cpu)
        .unwrap()
        .with_precision(Precision::Bf16);
    let mut trainer = Trainer::new(
        model,
        config(LossKind::Wasserstein, lr, false, 5),
        tokenizer.pad_id(),
    )
    .unwrap();
    for (step, want) in golden["wasserstein"]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        let got = trainer.step(&[&groups]).unwrap().loss;
        let rel = (got - want).abs() / want.abs();
        // Measured: 1.3e-3 to 6.1e-3 over the five steps.
        assert!(
            rel <= 2e-2,
            "bf16 step {step}: loss {got} vs PyTorch f32 {want}"
        );
        assert!(rel > 0.0, "bf16 step {step}: exactly f32's loss");
    }
}

#[test]
fn five_steps_reproduce_pytorch() {
    let GoldenSteps {
        golden,
        dir,
        mut tokenizer,
        groups,
        max_len,
        lr,
    } = golden_steps();
    for (name, kind) in [
        ("wasserstein", LossKind::Wasserstein),
        ("infonce", LossKind::Infonce),
    ] {
        let expected = &golden[name];
        let model = dir.load_model(&Device::Cpu).unwrap();
        let mut trainer =
            Trainer::new(model, config(kind, lr, false, 5), tokenizer.pad_id()).unwrap();
        for (step, want) in expected["losses"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = trainer.step(&[&groups]).unwrap().loss;
            let rel = (got - want).abs() / want.abs();
            assert!(
                rel <= 1e-4,
                "{name} step {step}: loss {got} vs PyTorch {want} (rel {rel:.2e})"
            );
        }
        let probe = expected["probe_text"].as_str().unwrap();
        let ids = tokenizer.encode_batch(&[probe], max_len).unwrap();
        let want: Vec<f64> = expected["probe_embedding_after"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let model = trainer.model();
        let mut embedder = CandleEmbedder::new(
            Bert::from_tensors(
                model.config().clone(),
                model.state().into_iter().collect(),
                "trained",
                &Device::Cpu,
            )
            .unwrap(),
            Pooling::Mean,
            false,
            tokenizer.pad_id(),
        );
        let got = embedder.embed(&[ids[0].as_slice()]).unwrap();
        assert_eq!(got.len(), want.len(), "{name}: probe embedding length");
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-4 * scale.max(1.0),
            "{name}: probe embedding after 5 steps differs by {worst}"
        );
    }
}

fn tiny_groups() -> Vec<TrainGroup> {
    (0..4u32)
        .map(|i| TrainGroup {
            query: vec![1, 5 + i, 9, 2],
            passages: (0..3u32)
                .map(|j| vec![1, 10 + i + j, 20 + j, 30 + i, 2])
                .collect(),
            labels: vec![3.0, 1.0, 0.0],
        })
        .collect()
}

fn params_of(trainer: &Trainer) -> Vec<Vec<f32>> {
    trainer
        .model()
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn resuming_from_a_checkpoint_equals_an_uninterrupted_run() {
    let groups = tiny_groups();
    let batches: Vec<&[TrainGroup]> = groups.chunks(2).collect();
    let mut cfg = config(LossKind::Wasserstein, 1e-2, true, 6);
    cfg.schedule.warmup_steps = 2;
    cfg.schedule.decay = Decay::Linear;
    cfg.max_grad_norm = Some(0.5);
    let fresh = || Bert::random(BertConfig::tiny(), 3, DType::F32, &Device::Cpu).unwrap();

    let mut straight = Trainer::new(fresh(), cfg, 0).unwrap();
    let mut straight_losses = Vec::new();
    // Two micro-batches per step: gradient accumulation.
    for _ in 0..6 {
        straight_losses.push(straight.step(&batches).unwrap().loss);
    }

    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let mut first = Trainer::new(fresh(), cfg, 0).unwrap();
    let mut losses = Vec::new();
    for _ in 0..3 {
        losses.push(first.step(&batches).unwrap().loss);
    }
    first.save_checkpoint(&checkpoint).unwrap();
    drop(first);
    let mut resumed = Trainer::new(fresh(), cfg, 0).unwrap();
    assert_eq!(resumed.load_checkpoint(&checkpoint).unwrap(), 3);
    for _ in 0..3 {
        losses.push(resumed.step(&batches).unwrap().loss);
    }
    assert_eq!(losses, straight_losses);
    assert_eq!(params_of(&resumed), params_of(&straight));
    // Training moved the weights and the loss went down.
    assert_ne!(
        params_of(&resumed),
        params_of(&Trainer::new(fresh(), cfg, 0).unwrap())
    );
    assert!(losses[5] < losses[0], "losses {losses:?}");
}

/// GradCache: a micro-batch embedded in chunks (no graph kept, loss on every embedding, then
/// each chunk re-embedded and backpropagated) has the unchunked batch's loss and gradients.
#[test]
fn chunked_steps_have_the_unchunked_gradients() {
    let groups: Vec<TrainGroup> = (0..6u32)
        .map(|i| TrainGroup {
            query: vec![1, 5 + i, 9 + (i % 3), 2],
            passages: (0..4u32)
                .map(|j| vec![1, 10 + i + j, 20 + j, 30 + i, 40 + (i * j) % 7, 2])
                .collect(),
            labels: vec![3.0, 2.0, 1.0, 0.0],
        })
        .collect();
    let model = || Bert::random(BertConfig::tiny(), 5, DType::F32, &Device::Cpu).unwrap();
    for (kind, in_batch) in [
        (LossKind::Wasserstein, true),
        (LossKind::Infonce, true),
        (LossKind::Wasserstein, false),
    ] {
        let mut cfg = config(kind, 1e-3, false, 1);
        cfg.in_batch_negatives = in_batch;
        let whole = Trainer::new(model(), cfg, 0).unwrap();
        let (loss, grads) = whole.loss_and_grads(&groups, 0, 0).unwrap();
        // Uneven chunks (4 + 2) and single groups.
        for chunk in [4, 1] {
            cfg.chunk_size = Some(chunk);
            let chunked = Trainer::new(model(), cfg, 0).unwrap();
            let (chunked_loss, chunked_grads) = chunked.loss_and_grads(&groups, 0, 0).unwrap();
            assert!((loss - chunked_loss).abs() <= 1e-6 * loss.abs().max(1.0));
            assert_eq!(grads.len(), chunked_grads.len());
            let (mut worst, mut scale) = (0f32, 0f32);
            for (a, b) in grads.iter().zip(&chunked_grads) {
                // The optimizer's moments are made from these: a gradient carrying its graph
                // would keep a step's activations alive for the rest of the run.
                assert!(
                    !a.track_op() && !b.track_op(),
                    "a gradient tracks its graph"
                );
                let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(&b) {
                    worst = worst.max((x - y).abs());
                    scale = scale.max(x.abs());
                }
            }
            assert!(scale > 0.0, "{kind:?}: no gradient at all");
            assert!(
                worst <= 1e-5 * scale,
                "{kind:?} in-batch {in_batch} chunk {chunk}: gradients differ by {worst} (largest {scale})"
            );
        }
    }
}
