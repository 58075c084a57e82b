//! The `tokens` table as training lists: for every epoch of the table, its lists in query order,
//! each a query and its passages by position with their labels. The table is read a record
//! batch at a time; the token ids go to one [`SpillVec`] (mapped from a file past
//! `tokens_in_memory_mb`) and the lists are spans into it, so a table larger than memory trains
//! as one that fits. A step's lists are copied out as it needs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::array::{AsArray, Float64Array, Int32Array, ListArray, RecordBatch, StringArray};
use arrow::datatypes::Int32Type;

use crate::pipeline::StageError;
use crate::stages::spill_vec::SpillVec;
use crate::table::columns;
use crate::train::TrainGroup;

/// Token ids `start..start + len` of the store.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    len: u32,
}

struct List {
    query: Span,
    passages: Vec<Span>,
    labels: Vec<f64>,
}

pub(super) struct TrainLists {
    tokens: SpillVec<u32>,
    epochs: Vec<Vec<List>>,
}

impl TrainLists {
    /// Epochs of lists in the table (0, 1, ...).
    pub fn epochs(&self) -> usize {
        self.epochs.len()
    }

    /// Lists in each epoch (every epoch has as many).
    pub fn lists(&self) -> usize {
        self.epochs.first().map_or(0, Vec::len)
    }

    /// List `i` of the table's epoch `epoch`.
    pub fn group(&self, epoch: usize, i: usize) -> TrainGroup {
        let tokens = self.tokens.as_slice();
        let ids = |span: Span| {
            let start = span.start as usize;
            tokens[start..start + span.len as usize].to_vec()
        };
        let list = &self.epochs[epoch][i];
        TrainGroup {
            query: ids(list.query),
            passages: list.passages.iter().map(|&p| ids(p)).collect(),
            labels: list.labels.clone(),
        }
    }

    /// Bytes of token ids mapped from a file (0 when they are held in memory).
    pub fn mapped_bytes(&self) -> u64 {
        self.tokens.mapped_bytes()
    }
}

/// A list as its rows arrive, in any order.
struct Pending {
    query: Span,
    /// (position, label, passage)
    rows: Vec<(i32, f64, Span)>,
}

/// Builds [`TrainLists`] from the `tokens` table's record batches.
pub(super) struct ListsBuilder {
    tokens: SpillVec<u32>,
    /// (epoch, query id) -> index in `pending`.
    index: HashMap<(i32, String), usize>,
    pending: Vec<Pending>,
    scratch: Vec<u32>,
    spill_dir: PathBuf,
}

impl ListsBuilder {
    /// Token ids past `memory_limit` bytes go to an unlinked file in `spill_dir`.
    pub fn new(memory_limit: u64, spill_dir: &Path) -> ListsBuilder {
        ListsBuilder {
            tokens: SpillVec::new(memory_limit, spill_dir),
            index: HashMap::new(),
            pending: Vec::new(),
            scratch: Vec::new(),
            spill_dir: spill_dir.to_path_buf(),
        }
    }

    pub fn add(&mut self, batch: &RecordBatch) -> Result<(), StageError> {
        let query = columns::get::<StringArray>(batch, "query_id");
        let epoch = columns::get::<Int32Array>(batch, "epoch");
        let position = columns::get::<Int32Array>(batch, "position");
        let label = columns::get::<Float64Array>(batch, "label");
        let query_tokens = columns::get::<ListArray>(batch, "query_tokens");
        let passage_tokens = columns::get::<ListArray>(batch, "passage_tokens");
        for row in 0..batch.num_rows() {
            let key = (epoch.value(row), query.value(row).to_string());
            let n = match self.index.get(&key) {
                Some(&n) => n,
                None => {
                    // A query's tokens are the same in each of its rows: kept once.
                    let query = self.push(query_tokens, row)?;
                    self.pending.push(Pending {
                        query,
                        rows: Vec::new(),
                    });
                    self.index.insert(key, self.pending.len() - 1);
                    self.pending.len() - 1
                }
            };
            let passage = self.push(passage_tokens, row)?;
            self.pending[n]
                .rows
                .push((position.value(row), label.value(row), passage));
        }
        Ok(())
    }

    /// Appends row `row`'s token ids of `list` to the store.
    fn push(&mut self, list: &ListArray, row: usize) -> Result<Span, StageError> {
        let offsets = list.value_offsets();
        let (from, to) = (offsets[row] as usize, offsets[row + 1] as usize);
        let ids = &list.values().as_primitive::<Int32Type>().values()[from..to];
        self.scratch.clear();
        self.scratch.extend(ids.iter().map(|&t| t as u32));
        let span = Span {
            start: self.tokens.len() as u64,
            len: ids.len() as u32,
        };
        self.tokens
            .extend(&self.scratch)
            .map_err(StageError::io(&self.spill_dir))?;
        Ok(span)
    }

    /// The lists by epoch and query, passages by position; every epoch numbered 0, 1, ...,
    /// with the same number of lists, each of one size (the losses need one group size).
    pub fn finish(self) -> Result<TrainLists, StageError> {
        let mut keys: Vec<((i32, String), usize)> = self.index.into_iter().collect();
        keys.sort_unstable();
        let mut pending: Vec<Option<Pending>> = self.pending.into_iter().map(Some).collect();
        let mut epochs: Vec<Vec<List>> = Vec::new();
        for ((epoch, _), n) in keys {
            let current = epochs.len() as i32 - 1;
            if epoch != current {
                if epoch != current + 1 {
                    let after = match current {
                        -1 => "comes first".to_string(),
                        _ => format!("follows epoch {current}"),
                    };
                    return Err(StageError::data(
                        "tokens",
                        None,
                        format!("epoch {epoch} {after}: epochs are numbered 0, 1, ..."),
                    ));
                }
                epochs.push(Vec::new());
            }
            let mut list = pending[n].take().expect("each list once");
            list.rows.sort_by_key(|&(position, _, _)| position);
            epochs.last_mut().expect("pushed above").push(List {
                query: list.query,
                passages: list.rows.iter().map(|&(_, _, p)| p).collect(),
                labels: list.rows.iter().map(|&(_, l, _)| l).collect(),
            });
        }
        check_shapes(&epochs)?;
        let tokens = self
            .tokens
            .finish()
            .map_err(StageError::io(&self.spill_dir))?;
        Ok(TrainLists { tokens, epochs })
    }
}

fn check_shapes(epochs: &[Vec<List>]) -> Result<(), StageError> {
    let size = |l: &List| l.passages.len();
    if let Some(first) = epochs.first().and_then(|e| e.first())
        && let Some(bad) = epochs.iter().flatten().find(|l| size(l) != size(first))
    {
        return Err(StageError::data(
            "tokens",
            None,
            format!(
                "groups of {} and {} passages: the losses need one group size",
                size(first),
                size(bad)
            ),
        ));
    }
    if let Some(bad) = epochs.iter().find(|e| e.len() != epochs[0].len()) {
        return Err(StageError::data(
            "tokens",
            None,
            format!(
                "epochs of {} and {} lists: every epoch needs the same queries",
                epochs[0].len(),
                bad.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table;

    /// A `tokens` batch of rows (query, epoch, position, label); a query's tokens are
    /// [100 + its number], a passage's [epoch, position, query number].
    fn batch(rows: &[(&str, i32, i32, f64)]) -> RecordBatch {
        let number = |q: &str| q[1..].parse::<u32>().unwrap();
        let queries: Vec<Vec<u32>> = rows.iter().map(|r| vec![100 + number(r.0)]).collect();
        let passages: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| vec![r.1 as u32, r.2 as u32, number(r.0)])
            .collect();
        RecordBatch::try_new(
            table::schema("tokens").unwrap().arrow(),
            vec![
                columns::utf8(rows.iter().map(|r| r.0)),
                columns::int32(rows.iter().map(|r| r.1)),
                columns::int32(rows.iter().map(|r| r.2)),
                columns::utf8(rows.iter().map(|_| "d")),
                columns::float64(rows.iter().map(|r| r.3)),
                columns::tokens(queries.iter().map(Vec::as_slice)),
                columns::tokens(passages.iter().map(Vec::as_slice)),
            ],
        )
        .unwrap()
    }

    fn build(batches: &[RecordBatch], memory_limit: u64) -> Result<TrainLists, StageError> {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = ListsBuilder::new(memory_limit, dir.path());
        for b in batches {
            builder.add(b)?;
        }
        builder.finish()
    }

    /// Rows in any order, split over batches, make the lists in (epoch, query) order with
    /// passages by position; the same whether the ids are held or mapped.
    #[test]
    fn rows_in_any_order_make_lists_by_epoch_and_query_held_or_mapped() {
        let batches = [
            batch(&[("q2", 1, 1, 0.5), ("q1", 0, 1, 0.0), ("q2", 0, 0, 3.0)]),
            batch(&[("q1", 1, 0, 2.0), ("q1", 0, 0, 1.0), ("q2", 1, 0, 1.5)]),
            batch(&[("q2", 0, 1, 2.5), ("q1", 1, 1, 0.25)]),
        ];
        for (limit, mapped) in [(1 << 20, false), (0, true)] {
            let lists = build(&batches, limit).unwrap();
            assert_eq!(lists.mapped_bytes() > 0, mapped);
            assert_eq!((lists.epochs(), lists.lists()), (2, 2));
            let g = lists.group(0, 0);
            assert_eq!(g.query, [101]);
            assert_eq!(g.passages, [[0, 0, 1], [0, 1, 1]]);
            assert_eq!(g.labels, [1.0, 0.0]);
            let g = lists.group(0, 1);
            assert_eq!((g.query, g.labels), (vec![102], vec![3.0, 2.5]));
            let g = lists.group(1, 1);
            assert_eq!(g.passages, [[1, 0, 2], [1, 1, 2]]);
            assert_eq!(g.labels, [1.5, 0.5]);
            assert_eq!(lists.group(1, 0).labels, [2.0, 0.25]);
        }
    }

    #[test]
    fn epochs_must_be_numbered_from_zero_with_lists_of_one_size() {
        let error = |rows: &[(&str, i32, i32, f64)]| match build(&[batch(rows)], 1 << 20) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{rows:?} accepted"),
        };
        assert!(error(&[("q1", 1, 0, 1.0)]).contains("epoch 1 comes first"));
        let gap = error(&[("q1", 0, 0, 1.0), ("q1", 2, 0, 1.0)]);
        assert!(gap.contains("epoch 2 follows epoch 0"), "{gap}");
        let sizes = error(&[("q1", 0, 0, 1.0), ("q1", 0, 1, 0.0), ("q2", 0, 0, 1.0)]);
        assert!(sizes.contains("groups of 2 and 1 passages"), "{sizes}");
        let counts = error(&[("q1", 0, 0, 1.0), ("q2", 0, 0, 1.0), ("q1", 1, 0, 1.0)]);
        assert!(counts.contains("epochs of 2 and 1 lists"), "{counts}");
    }
}
