//! The measures reproduce pytrec_eval (trec_eval 9.0.8) exactly, at relevance levels 1 and 2,
//! on a run full of score ties (../shared/golden/metrics).

mod common;

use synthrank::metrics::{self, EvalOptions, Measure, Qrels, Run, RunBuilder};

const MEASURES: &[&str] = &[
    "P.1,5,10",
    "Rprec",
    "map",
    "map_cut.10,100",
    "ndcg",
    "ndcg_cut.5,10,100",
    "recall.10,100,1000",
    "recip_rank",
    "success.1,5,10",
];

fn golden() -> (Qrels, Run, serde_json::Value) {
    let dir = common::shared().join("golden/metrics");
    let mut qrels = Qrels::default();
    for line in std::fs::read_to_string(dir.join("qrels.tsv"))
        .unwrap()
        .lines()
        .skip(1)
    {
        let f: Vec<&str> = line.split('\t').collect();
        qrels.insert(f[0], f[1], f[2].parse().unwrap());
    }
    let mut run = RunBuilder::default();
    for line in std::fs::read_to_string(dir.join("run.trec"))
        .unwrap()
        .lines()
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        run.insert(f[0], f[2], f[4].parse().unwrap());
    }
    let expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (qrels, run.finish(), expected)
}

fn measures() -> Vec<Measure> {
    MEASURES
        .iter()
        .flat_map(|m| Measure::parse_list(m).unwrap())
        .collect()
}

#[test]
fn per_query_values_match_trec_eval_at_both_relevance_levels() {
    let (qrels, run, expected) = golden();
    let measures = measures();
    assert_eq!(measures.len(), 18);
    for level in [1, 2] {
        let want = expected["results"][format!("relevance_level_{level}")]
            .as_object()
            .unwrap();
        let got = metrics::evaluate(
            &qrels,
            &run,
            &measures,
            EvalOptions {
                relevance_level: level,
                complete: false,
            },
        );
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "evaluated queries (judged and in the run)"
        );
        let mut compared = 0;
        for (query, values) in want {
            for (name, value) in values.as_object().unwrap() {
                let actual = got[query][name];
                let value = value.as_f64().unwrap();
                assert!(
                    (actual - value).abs() <= 1e-9,
                    "level {level}, {query}, {name}: {actual} != {value}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 31 * 18);
    }
}

#[test]
fn complete_mode_scores_missing_queries_as_zero() {
    let (qrels, run, _) = golden();
    let measures = measures();
    let plain = metrics::evaluate(&qrels, &run, &measures, EvalOptions::default());
    let complete = metrics::evaluate(
        &qrels,
        &run,
        &measures,
        EvalOptions {
            relevance_level: 1,
            complete: true,
        },
    );
    assert_eq!(
        complete.len(),
        plain.len() + 2,
        "q5 and q31 are judged but not retrieved"
    );
    assert!(complete["q5"].values().all(|&v| v == 0.0));
    let (m_plain, m_complete) = (
        metrics::mean(&plain)["map"],
        metrics::mean(&complete)["map"],
    );
    assert!((m_complete - m_plain * 31.0 / 33.0).abs() < 1e-12);
}

#[test]
fn ties_are_broken_by_document_id_descending() {
    let mut qrels = Qrels::default();
    qrels.insert("q", "a", 1);
    let mut run = RunBuilder::default();
    for doc in ["a", "b", "c"] {
        run.insert("q", doc, 1.0);
    }
    let rr = metrics::evaluate(
        &qrels,
        &run.finish(),
        &[Measure::RecipRank],
        EvalOptions::default(),
    );
    assert_eq!(
        rr["q"]["recip_rank"],
        1.0 / 3.0,
        "c, b, a: the relevant `a` ranks third"
    );
}

#[test]
fn mrr_cut_counts_only_the_top_k() {
    let mut qrels = Qrels::default();
    qrels.insert("q", "d11", 1);
    let mut run = RunBuilder::default();
    for i in 0..20 {
        run.insert("q", &format!("d{i}"), -(i as f64));
    }
    let values = &metrics::evaluate(
        &qrels,
        &run.finish(),
        &[Measure::MrrCut(10), Measure::RecipRank],
        EvalOptions::default(),
    )["q"];
    assert_eq!(values["mrr_cut_10"], 0.0);
    assert_eq!(values["recip_rank"], 1.0 / 12.0);
}

#[test]
fn measure_names_parse_like_trec_eval() {
    assert_eq!(
        Measure::parse_list("ndcg_cut.5,10").unwrap(),
        vec![Measure::NdcgCut(5), Measure::NdcgCut(10)]
    );
    assert_eq!("P_10".parse::<Measure>().unwrap(), Measure::Precision(10));
    assert_eq!(
        "recip_rank".parse::<Measure>().unwrap().name(),
        "recip_rank"
    );
    assert!("ndcg_cut".parse::<Measure>().is_err());
    assert!("P.0".parse::<Measure>().is_err());
}

#[test]
fn eval_command_prints_trec_eval_format() {
    let dir = common::shared().join("golden/metrics");
    let out = common::synthrank(&[
        "eval",
        "--qrels",
        dir.join("qrels.tsv").to_str().unwrap(),
        "--run",
        dir.join("run.trec").to_str().unwrap(),
        "-m",
        "ndcg_cut.10",
        "P.5",
        "-l",
        "2",
        "-q",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let q10 = expected["results"]["relevance_level_2"]["q10"]["ndcg_cut_10"]
        .as_f64()
        .unwrap();
    assert!(
        text.contains(&format!("ndcg_cut_10           \tq10\t{q10:.4}")),
        "{text}"
    );
    assert!(text.contains("num_q                 \tall\t31"), "{text}");
    let bad = common::synthrank(&["eval", "--qrels", "x", "--run", "y", "-m", "ndgc"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        common::stderr(&bad).starts_with("error: unknown measure `ndgc`"),
        "{}",
        common::stderr(&bad)
    );
}

/// A query whose retrieved documents are all judged non-relevant (or unjudged) scores 0: printed
/// `0.0000` as trec_eval prints it, never `-0.0000`, on a graded qrels file.
#[test]
fn queries_retrieving_nothing_relevant_print_zero_not_negative_zero() {
    let dir = tempfile::tempdir().unwrap();
    let qrels = dir.path().join("qrels.txt");
    let run = dir.path().join("run.txt");
    std::fs::write(&qrels, "q1 0 d1 2\nq1 0 d2 0\nq2 0 d3 1\nq3 0 d4 3\n").unwrap();
    std::fs::write(
        &run,
        "q1 Q0 d2 1 3.0 r\nq1 Q0 d5 2 2.0 r\nq2 Q0 d3 1 1.0 r\nq3 Q0 d6 1 1.0 r\n",
    )
    .unwrap();
    let out = common::synthrank(&[
        "eval",
        "--qrels",
        qrels.to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
        "-m",
        "ndcg_cut.10",
        "ndcg",
        "map",
        "-q",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(!text.contains("-0.0000"), "{text}");
    for query in ["q1", "q3"] {
        assert!(
            text.contains(&format!("ndcg_cut_10           \t{query}\t0.0000")),
            "{text}"
        );
    }
}
