//! Exact search agrees with brute force, ties included, for any blocking and thread count; the
//! `search` and `evaluate` stages turn embeddings into runs and runs into metrics.

mod common;

use rand::{Rng, SeedableRng};
use synthrank::pipeline::{Selection, query_session, read_only_sql};
use synthrank::retrieval::{self, Hit, SearchOptions, Vectors};

/// Sorting every score: the reference the blocked top-k must equal.
fn brute_force(
    q: &[f32],
    d: &[f32],
    dim: usize,
    ids: &[String],
    k: usize,
    exclude: &[Option<u32>],
) -> Vec<Vec<Hit>> {
    let nd = d.len() / dim;
    (0..q.len() / dim)
        .map(|i| {
            let mut all: Vec<Hit> = (0..nd)
                .filter(|&j| exclude.get(i).copied().flatten() != Some(j as u32))
                .map(|j| Hit {
                    doc: j as u32,
                    // `+ 0.0`: -0.0 and 0.0 are the same score.
                    score: retrieval::dot(&q[i * dim..(i + 1) * dim], &d[j * dim..(j + 1) * dim])
                        + 0.0,
                })
                .filter(|h| !h.score.is_nan())
                .collect();
            all.sort_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then(ids[b.doc as usize].cmp(&ids[a.doc as usize]))
            });
            all.truncate(k);
            all
        })
        .collect()
}

fn assert_search_equals_brute_force(
    q: &[f32],
    d: &[f32],
    dim: usize,
    ids: &[String],
    exclude: &[Option<u32>],
    options: SearchOptions,
    trial: usize,
) {
    let got = retrieval::search(
        Vectors { data: q, dim },
        Vectors { data: d, dim },
        &retrieval::id_ranks(ids),
        exclude,
        options,
    )
    .unwrap();
    let want = brute_force(q, d, dim, ids, options.k, exclude);
    let (nq, nd) = (q.len() / dim, d.len() / dim);
    assert_eq!(
        got, want,
        "trial {trial}: nq={nq} nd={nd} dim={dim} {options:?}"
    );
}

#[test]
fn blocked_search_equals_brute_force_with_ties() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for trial in 0..12 {
        let dim = [1, 3, 8, 33][trial % 4];
        let (nq, nd) = (rng.random_range(1..40), rng.random_range(1..300));
        // Small integers: exact products and many tied scores.
        let mut values = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(-2..3) as f32)
                .collect::<Vec<f32>>()
        };
        let q = values(nq * dim);
        let d = values(nd * dim);
        let ids: Vec<String> = (0..nd).map(|j| format!("d{}", (j * 7919) % 1000)).collect();
        let exclude: Vec<Option<u32>> = (0..nq)
            .map(|i| (trial % 2 == 0).then_some((i % nd) as u32))
            .collect();
        let k = [1, 5, 10, 500][trial % 4];
        let options = SearchOptions {
            k,
            threads: 1 + trial % 3,
            query_block: [1, 7, 128][trial % 3],
            // Chunks of one panel, of a few (past the threads' groups), and automatic.
            chunk_docs: [16, 200, 0][trial % 3],
        };
        assert_search_equals_brute_force(&q, &d, dim, &ids, &exclude, options, trial);
    }
}

/// Real-valued vectors where the 8-bit first pass is far from exact: norms spanning six orders
/// of magnitude, near-duplicates (scores apart by less than the quantization error), exact
/// duplicates, zero and non-finite vectors. Skipping a document that belongs in the top k, or
/// keeping one that does not, shows up as a difference from brute force.
#[test]
fn search_is_exact_where_the_integer_pass_is_not() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for trial in 0..6 {
        let dim = [384, 5, 64][trial % 3];
        let (nq, nd) = (rng.random_range(1..30), rng.random_range(500..3000));
        let gaussian = |n: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
            (0..n)
                .map(|_| (0..12).map(|_| rng.random::<f32>()).sum::<f32>() - 6.0)
                .collect()
        };
        let q = gaussian(nq * dim, &mut rng);
        let mut d = gaussian(nd * dim, &mut rng);
        for j in 0..nd {
            let row = j * dim..(j + 1) * dim;
            match j % 7 {
                // Scaled: the per-document scale and the bound's norms must follow.
                0 => d[row]
                    .iter_mut()
                    .for_each(|v| *v *= 10f32.powi(rng.random_range(-3..4))),
                // A near-duplicate of the previous document.
                1 => {
                    let previous = d[row.start - dim..row.start].to_vec();
                    for (v, p) in d[row].iter_mut().zip(previous) {
                        *v = p * (1.0 + rng.random_range(-1e-4..1e-4));
                    }
                }
                // An exact duplicate of the previous document: a tie broken by id.
                2 => d.copy_within(row.start - dim..row.start, row.start),
                // Subnormal: 127 over its largest component overflows f32.
                3 if j % 3 == 0 => d[row].iter_mut().for_each(|v| *v *= 1e-39),
                _ => {}
            }
        }
        d[5 * dim..6 * dim].fill(0.0);
        d[6 * dim] = f32::NAN;
        d[13 * dim + 1] = f32::INFINITY;
        let ids: Vec<String> = (0..nd).map(|j| format!("d{}", (j * 7919) % 5000)).collect();
        let exclude: Vec<Option<u32>> = (0..nq).map(|i| Some((i * 3 % nd) as u32)).collect();
        let k = [10, 100, 1][trial % 3];
        let options = SearchOptions {
            k,
            threads: 1 + trial % 2,
            query_block: [4, 64][trial % 2],
            chunk_docs: [0, 100, 1000][trial % 3],
        };
        assert_search_equals_brute_force(&q, &d, dim, &ids, &exclude, options, trial);
    }
}

#[test]
fn dimension_mismatch_is_an_error() {
    let err = retrieval::search(
        Vectors {
            data: &[1.0, 2.0],
            dim: 2,
        },
        Vectors {
            data: &[1.0, 2.0, 3.0],
            dim: 3,
        },
        &[0],
        &[],
        SearchOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "queries have dimension 2, documents 3");
}

#[test]
fn dimensions_past_exact_integer_sums_are_an_error() {
    let dim = retrieval::MAX_DIM + 1;
    let one = vec![1.0; dim];
    let vectors = Vectors { data: &one, dim };
    let err = retrieval::search(vectors, vectors, &[0], &[], SearchOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dimension 65537 is beyond the 65536 whose byte products sum exactly in 32 bits"
    );
    let dim = retrieval::MAX_DIM;
    let vectors = Vectors {
        data: &one[..dim],
        dim,
    };
    let hits = retrieval::search(vectors, vectors, &[0], &[], SearchOptions::default()).unwrap();
    assert_eq!(hits[0][0].score, dim as f32);
}

const SPEC: &str = r#"name: retrieval
workdir: work
stages:
  - name: doc_vectors
    kind: sql
    config:
      schema: embeddings
      query: >
        SELECT id, make_array(CAST(x AS FLOAT), CAST(y AS FLOAT)) AS vector
        FROM (VALUES ('d1', 1.0, 0.0), ('d2', 0.0, 1.0), ('d3', 0.7, 0.7), ('q2', 0.6, 0.8)) AS t(id, x, y)
  - name: query_vectors
    kind: sql
    config:
      schema: embeddings
      query: >
        SELECT id, make_array(CAST(x AS FLOAT), CAST(y AS FLOAT)) AS vector
        FROM (VALUES ('q1', 1.0, 0.0), ('q2', 0.0, 1.0)) AS t(id, x, y)
  - name: qrels
    kind: sql
    config:
      schema: qrels
      query: >
        SELECT * FROM (VALUES ('q1', 'd1', 1), ('q1', 'd3', 2), ('q2', 'd2', 1)) AS t(query_id, doc_id, relevance)
  - name: runs
    kind: search
    inputs: {queries: query_vectors, corpus: doc_vectors}
    config: {k: 2, exclude_self: true}
  - name: metrics
    kind: evaluate
    inputs: {runs: runs, qrels: qrels}
    config: {measures: [ndcg_cut.2, P.1, recall.2]}
  - name: top1
    kind: search
    inputs: {queries: query_vectors, corpus: doc_vectors}
    config: {k: 1, exclude_self: true}
  - name: top1_metrics
    kind: evaluate
    inputs: {runs: top1, qrels: qrels}
    config: {measures: [ndcg_cut.2, P.1, recall.2]}
  - name: report
    kind: report
    inputs: [metrics, top1_metrics]
    config: {title: "k = 2 against k = 1"}
"#;

#[test]
fn search_and_evaluate_stages() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "p.yaml", SPEC);
    let pipeline = common::load(&spec, &dir.path().join("work"));
    common::run(&pipeline, Selection::All, false);
    let rt = common::runtime();
    let rows = |sql: &str| -> String {
        rt.block_on(async {
            let ctx = query_session(&pipeline).await.unwrap();
            let batches = read_only_sql(&ctx, sql)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string()
        })
    };
    // q2 = (0, 1): its own document `q2` (0.8) is excluded; d2 (1.0) then d3 (0.7).
    let runs = rows(
        "SELECT query_id, doc_id, rank, round(score, 4) AS score FROM runs ORDER BY query_id, rank",
    );
    assert_eq!(
        runs,
        "+----------+--------+------+-------+\n\
         | query_id | doc_id | rank | score |\n\
         +----------+--------+------+-------+\n\
         | q1       | d1     | 1    | 1.0   |\n\
         | q1       | d3     | 2    | 0.7   |\n\
         | q2       | d2     | 1    | 1.0   |\n\
         | q2       | d3     | 2    | 0.7   |\n\
         +----------+--------+------+-------+"
    );
    let metrics = rows(
        "SELECT query_id, measure, round(value, 6) AS value FROM metrics ORDER BY query_id, measure",
    );
    // q1 ranks d1 (1) above d3 (2): DCG = 1 + 2/log2(3), ideal 2 + 1/log2(3).
    assert_eq!(
        metrics,
        "+----------+------------+----------+\n\
         | query_id | measure    | value    |\n\
         +----------+------------+----------+\n\
         | all      | P_1        | 1.0      |\n\
         | all      | ndcg_cut_2 | 0.929859 |\n\
         | all      | recall_2   | 1.0      |\n\
         | q1       | P_1        | 1.0      |\n\
         | q1       | ndcg_cut_2 | 0.859719 |\n\
         | q1       | recall_2   | 1.0      |\n\
         | q2       | P_1        | 1.0      |\n\
         | q2       | ndcg_cut_2 | 1.0      |\n\
         | q2       | recall_2   | 1.0      |\n\
         +----------+------------+----------+"
    );
}

#[test]
fn search_needs_named_roles_for_two_embeddings_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        &SPEC.replace(
            "inputs: {queries: query_vectors, corpus: doc_vectors}",
            "inputs: [query_vectors, doc_vectors]",
        ),
    );
    let err = synthrank::pipeline::Pipeline::load(&spec, &synthrank::stages::registry(), None)
        .err()
        .unwrap();
    assert!(
        err.to_string().ends_with(
            ":26: stage `runs` (search): input `query_vectors` fills no role by its kind `embeddings`; name the roles (it takes: `queries` (kind `embeddings`), `corpus` (kind `embeddings`))"
        ),
        "{err}"
    );
}

#[test]
fn report_compares_runs_in_html_svg_markdown_and_latex() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "p.yaml", SPEC);
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    let report = work.join("report");
    let markdown = std::fs::read_to_string(report.join("summary.md")).unwrap();
    // k = 1 keeps only d1 (relevance 1) for q1: nDCG@2 = 1 / (2 + 1/log2 3) = 0.3801; mean 0.6900.
    assert_eq!(
        markdown,
        "| run | P_1 | ndcg_cut_2 | recall_2 |\n|---|---:|---:|---:|\n\
         | metrics | 1.0000 | 0.9299 | 1.0000 |\n\
         | top1_metrics | 1.0000 | 0.6900 | 0.7500 |\n"
    );
    let latex = std::fs::read_to_string(report.join("summary.tex")).unwrap();
    assert!(
        latex.contains("run & P\\_1 & ndcg\\_cut\\_2 & recall\\_2 \\\\"),
        "{latex}"
    );
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("<h1>k = 2 against k = 1</h1>"));
    for plot in [
        "plots/metrics.svg",
        "plots/per_query_ndcg_cut_2.svg",
        "plots/per_query_P_1.svg",
    ] {
        assert!(
            html.contains(&format!("src=\"{plot}\"")),
            "{plot} is linked"
        );
        let svg = std::fs::read_to_string(report.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{plot}"
        );
    }
    let bars = std::fs::read_to_string(report.join("plots/metrics.svg")).unwrap();
    assert_eq!(bars.matches("<title>").count(), 6, "3 measures x 2 runs");
    // The summary is a table too, for SQL.
    let rows: usize = synthrank::table::read_batches(&report.join("summary.parquet"))
        .unwrap()
        .iter()
        .map(arrow::array::RecordBatch::num_rows)
        .sum();
    assert_eq!(rows, 6);
}
