//! `pipelines/paper-eval.yaml` end to end on shipped data: BEIR SciFact and the SciFact sample
//! as two BEIR datasets, the sample standing in for MS MARCO dev, DL 19 and DL 20.

mod common;

use std::path::Path;

fn link(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

/// A data directory in the layout paper-eval.yaml documents.
fn data_dir(root: &Path) {
    let mini = common::repo().join("data-samples/scifact-mini");
    let msmarco = root.join("msmarco");
    std::fs::create_dir_all(msmarco.join("qrels")).unwrap();
    for file in ["corpus.jsonl", "queries.jsonl"] {
        link(&mini.join(file), &msmarco.join(file));
    }
    for split in ["dev", "test"] {
        link(
            &mini.join("qrels/test.tsv"),
            &msmarco.join(format!("qrels/{split}.tsv")),
        );
    }
    let dl20 = root.join("trec-dl-2020");
    std::fs::create_dir_all(dl20.join("qrels")).unwrap();
    link(&mini.join("queries.jsonl"), &dl20.join("queries.jsonl"));
    link(&mini.join("qrels/test.tsv"), &dl20.join("qrels/test.tsv"));
    std::fs::create_dir_all(root.join("beir")).unwrap();
    link(
        &common::shared().join("datasets/scifact"),
        &root.join("beir/scifact"),
    );
    link(&mini, &root.join("beir/scifact_mini"));
}

#[test]
fn the_evaluation_suite_runs_and_reports_the_beir_average() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    data_dir(&data);
    let spec = common::repo().join("pipelines/paper-eval.yaml");
    let workdir = dir.path().join("work");
    let vars = [
        format!("data={}", data.display()),
        format!("model={}", common::demo_model("all-MiniLM-L6-v2").display()),
        format!(
            "onnxruntime={}",
            common::demo_model("onnxruntime/libonnxruntime.so.1.31.1").display()
        ),
        "beir=[scifact, scifact_mini]".to_string(),
    ];
    let args = |command: &str, extra: &[&str]| -> Vec<String> {
        let mut a = vec![command.to_string(), spec.display().to_string()];
        a.extend(extra.iter().map(std::string::ToString::to_string));
        for v in &vars {
            a.push("--var".into());
            a.push(v.clone());
        }
        a.push("--workdir".into());
        a.push(workdir.display().to_string());
        a
    };
    let run = |command: &str, extra: &[&str]| {
        let a = args(command, extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        common::success(&common::synthrank(&refs))
    };
    run("run", &[]);
    let table = run(
        "sql",
        &[
            "SELECT run, round(value, 4) AS ndcg10, queries FROM report.summary \
             WHERE measure = 'ndcg_cut_10' ORDER BY run",
            "--format",
            "csv",
        ],
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let runs: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(
        runs,
        [
            "beir_average",
            "dl19",
            "dl20",
            "msmarco_dev",
            "scifact",
            "scifact_mini"
        ],
        "{table}"
    );
    let value = |run: &str| -> f64 {
        rows.iter().find(|r| r[0] == run).unwrap()[1]
            .parse()
            .unwrap()
    };
    // all-MiniLM-L6-v2's published SciFact nDCG@10 (sentence-transformers: 0.6451).
    assert!((value("scifact") - 0.6451).abs() < 5e-4, "{table}");
    assert!(
        (value("beir_average") - (value("scifact") + value("scifact_mini")) / 2.0).abs() < 2e-4,
        "{table}"
    );
    assert_eq!(rows.iter().find(|r| r[0] == "scifact").unwrap()[2], "300");
    // Every BEIR cutoff of the reference is computed.
    let measures = run(
        "sql",
        &[
            "SELECT count(DISTINCT measure) AS n FROM scifact WHERE query_id = 'all'",
            "--format",
            "csv",
        ],
    );
    assert_eq!(measures, "n\n25\n");
}
