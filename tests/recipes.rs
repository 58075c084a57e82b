//! The shipped paper recipes carry the reference implementation's values (the `sycl`
//! repository's commands on `trove`, with DeepSpeed's WarmupDecayLR), and the evaluation suite
//! covers the paper's datasets and cutoffs.

mod common;

use serde_json::{Value, json};
use synthrank::spec::PipelineSpec;

fn spec(name: &str) -> PipelineSpec {
    PipelineSpec::load(&common::repo().join("pipelines").join(name))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn config<'a>(spec: &'a PipelineSpec, stage: &str) -> &'a Value {
    &spec
        .stage(stage)
        .unwrap_or_else(|| panic!("{}: no stage `{stage}`", spec.name))
        .config
}

fn assert_fields(spec: &PipelineSpec, stage: &str, want: &Value) {
    let got = config(spec, stage);
    for (field, value) in want.as_object().unwrap() {
        assert_eq!(&got[field], value, "{} {stage}.{field}", spec.name);
    }
}

/// What every reference training command shares: 64 queries per loss (16 per GPU on 4 GPUs,
/// gathered), 4 accumulation steps, lr 1e-5, one epoch, DeepSpeed's log warmup over a ceiling
/// of 5% of the steps, mean pooling without normalization, 256-token queries and passages.
fn assert_reference_training(spec: &PipelineSpec, loss: &str, group_size: u64) {
    assert_fields(
        spec,
        "train",
        &json!({
            "loss": loss, "temperature": 1.0, "pooling": "mean", "normalize": false,
            "batch_size": 64, "grad_accumulation": 4, "epochs": 1, "lr": 1.0e-5,
            "warmup": "deepspeed_log", "warmup_ratio": 0.05, "decay": "linear",
            "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 42
        }),
    );
    assert_fields(
        spec,
        "tokens",
        &json!({"max_query_len": 256, "max_passage_len": 256}),
    );
    assert_eq!(config(spec, "lists")["group_size"], group_size);
    for stage in ["corpus_embeddings", "query_embeddings"] {
        assert_eq!(config(spec, stage)["max_length"], 256, "{stage}");
    }
}

#[test]
fn sycl_recipe_matches_the_reference() {
    let s = spec("sycl-msmarco.yaml");
    assert_reference_training(&s, "wasserstein", 4);
    assert_fields(&s, "lists", &json!({"selection": "random"}));
    assert!(config(&s, "lists").get("binary").is_none());
}

#[test]
fn infonce_baseline_matches_the_reference() {
    let s = spec("infonce-binary.yaml");
    assert_reference_training(&s, "infonce", 3);
    assert_fields(
        &s,
        "lists",
        &json!({"selection": "random", "binary": {"threshold": 2}}),
    );
}

#[test]
fn synthetic_plus_real_matches_the_reference() {
    let s = spec("synth-plus-real.yaml");
    assert_reference_training(&s, "wasserstein", 7);
    assert_fields(
        &s,
        "lists",
        &json!({
            "selection": "random",
            "sources": [
                {"input": "qrels", "min_score": 1, "score_transform": 3},
                {"input": "negatives", "score_transform": 1, "group_random_k": 2},
                {"input": "graded"}
            ]
        }),
    );
}

#[test]
fn the_evaluation_suite_covers_the_papers_table() {
    let s = spec("paper-eval.yaml");
    let beir = [
        "arguana",
        "climate_fever",
        "cqadupstack_android",
        "dbpedia",
        "fever",
        "fiqa",
        "hotpotqa",
        "nfcorpus",
        "nq",
        "quora",
        "scidocs",
        "scifact",
        "touche2020",
        "trec_covid",
    ];
    for dataset in beir {
        let measures = &config(&s, dataset)["measures"];
        for family in ["ndcg_cut", "recall", "map_cut", "mrr_cut", "P"] {
            assert!(
                measures
                    .as_array()
                    .unwrap()
                    .contains(&json!(format!("{family}.1,3,5,10,100"))),
                "{dataset}: {family} at 1/3/5/10/100"
            );
        }
        assert_eq!(
            config(&s, &format!("{dataset}_query_embeddings"))["max_length"],
            256
        );
        assert_eq!(
            config(&s, &format!("{dataset}_corpus_embeddings"))["max_length"],
            256
        );
    }
    assert_fields(
        &s,
        "msmarco_dev",
        &json!({"measures": ["mrr_cut.10", "recall.1000", "ndcg_cut.10"]}),
    );
    for dl in ["dl19", "dl20"] {
        assert_eq!(config(&s, dl)["measures"][0], "ndcg_cut.10");
    }
    let report = s.stage("report").unwrap();
    assert_eq!(report.inputs.len(), 3 + beir.len());
    assert_eq!(
        config(&s, "report")["averages"],
        json!([{"name": "beir_average", "runs": beir}])
    );
}
