//! Bad input never panics: random bytes, and valid files cut and mutated at random, fed to
//! every loader, the answer parser and the journal reader give a value or an error, never a
//! panic. Seeded, so a failure names an input that can be replayed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use synthrank::formats::{self, Header};
use synthrank::llm::{Journal, parse_all_levels, parse_single_level};

const TRIALS: usize = 300;

/// Valid inputs of each format, for mutation.
const SEEDS: &[&str] = &[
    "{\"_id\": \"d1\", \"title\": \"T\", \"text\": \"some text\"}\n{\"_id\": \"d2\", \"text\": \"más\"}\n",
    "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n",
    "q1 0 d1 1\nq1 0 d2 0\nq2 Q0 d3 2\n",
    "<top>\n<num> Number: 301\n<title> foreign minorities\n<desc> Description:\nwhich?\n</top>\n",
    "q1 Q0 d1 1 12.5 run\nq1 Q0 d2 2 11.0 run\n",
    "{\"hash\": \"h\", \"response\": {\"text\": \"x\", \"model\": \"m\", \"prompt_tokens\": 1, \"completion_tokens\": 2}, \"attempts\": 1}\n",
    "```json\n{\"3\": \"a\", \"2\": \"b\", \"Level 1\": \"c\", \"0\": \"\"}\n```",
];

/// Random bytes, or a seed cut short and with a few bytes replaced or inserted.
fn input(rng: &mut ChaCha8Rng) -> Vec<u8> {
    if rng.random_bool(0.3) {
        let n = rng.random_range(0..512);
        return (0..n).map(|_| rng.random()).collect();
    }
    let mut bytes = SEEDS[rng.random_range(0..SEEDS.len())].as_bytes().to_vec();
    bytes.truncate(rng.random_range(0..=bytes.len()));
    for _ in 0..rng.random_range(0..6) {
        let at = rng.random_range(0..=bytes.len());
        let byte =
            [b'\n', b'\t', b'"', b'{', b'}', b'\\', 0, 0xff, b' ', b'9'][rng.random_range(0..10)];
        match rng.random_bool(0.5) {
            true if at < bytes.len() => bytes[at] = byte,
            _ => bytes.insert(at, byte),
        }
    }
    bytes
}

/// Runs `f` on the file; a panic fails the test with the trial's bytes.
fn no_panic(trial: usize, bytes: &[u8], what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        panic!(
            "{what} panicked on trial {trial}, input {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn loaders_parser_and_journal_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let (mut errors, mut values) = (0usize, 0usize);
    let mut count = |ok: bool| if ok { values += 1 } else { errors += 1 };
    for trial in 0..TRIALS {
        let bytes = input(&mut rng);
        let file = dir.path().join(format!("input-{}.txt", trial % 7));
        std::fs::write(&file, &bytes).unwrap();
        let path: &Path = &file;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        no_panic(trial, &bytes, "loaders", || {
            count(formats::beir_jsonl(path, &["_id", "title", "text"], &["title"]).is_ok());
            count(formats::tsv(path, 3, Header::IfLastFieldNotNumeric).is_ok());
            count(formats::tsv(path, 2, Header::No).is_ok());
            count(formats::trec_qrels(path).is_ok());
            count(formats::trec_topics(path, "title").is_ok());
            count(formats::trec_run(path).is_ok());
            count(formats::qrels(path).is_ok());
            count(formats::parquet_rows(path, &["doc_id".into()], &[]).is_ok());
        });
        no_panic(trial, &bytes, "the answer parser", || {
            let (passages, _) = parse_all_levels(&text, &[3, 2, 1, 0]);
            count(!passages.is_empty());
            count(parse_single_level(&text, 2).is_ok());
        });
        no_panic(trial, &bytes, "the journal", || {
            count(Journal::entries(path).is_ok_and(|e| e.collect::<Result<Vec<_>, _>>().is_ok()));
            let journal = dir.path().join(format!("journal-{trial}.jsonl"));
            std::fs::write(&journal, &bytes).unwrap();
            // A live journal opens whatever it holds: damaged lines are skipped.
            assert!(Journal::open(&journal).is_ok());
        });
    }
    // Both outcomes occur: the inputs exercise the error paths and the success paths.
    assert!(
        errors > TRIALS && values > TRIALS / 10,
        "{errors} errors, {values} values"
    );
}
