//! Table kinds: the Arrow schema of every table a stage reads or writes, defined in `schemas/`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::Deserialize;

use super::TableError;

/// Schema files compiled into the binary so it works from any directory.
const SCHEMA_FILES: &[(&str, &str)] = &[
    ("queries", include_str!("../../schemas/queries.yaml")),
    ("corpus", include_str!("../../schemas/corpus.yaml")),
    ("qrels", include_str!("../../schemas/qrels.yaml")),
    ("prompts", include_str!("../../schemas/prompts.yaml")),
    ("embeddings", include_str!("../../schemas/embeddings.yaml")),
    ("runs", include_str!("../../schemas/runs.yaml")),
    ("metrics", include_str!("../../schemas/metrics.yaml")),
    (
        "generations",
        include_str!("../../schemas/generations.yaml"),
    ),
    (
        "graded_docs",
        include_str!("../../schemas/graded_docs.yaml"),
    ),
    ("rejects", include_str!("../../schemas/rejects.yaml")),
    ("groups", include_str!("../../schemas/groups.yaml")),
    ("tokens", include_str!("../../schemas/tokens.yaml")),
    ("train_log", include_str!("../../schemas/train_log.yaml")),
    ("model", include_str!("../../schemas/model.yaml")),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSchema {
    pub kind: String,
    pub description: String,
    pub columns: Vec<ColumnSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: ColumnType,
    #[serde(default)]
    pub nullable: bool,
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ColumnType {
    #[serde(rename = "utf8")]
    Utf8,
    #[serde(rename = "int32")]
    Int32,
    #[serde(rename = "int64")]
    Int64,
    #[serde(rename = "float64")]
    Float64,
    #[serde(rename = "bool")]
    Bool,
    /// FixedSizeList<Float32>; the size is the table's, not the kind's.
    #[serde(rename = "vector")]
    Vector,
    /// List<Int32>: token ids.
    #[serde(rename = "tokens")]
    Tokens,
}

impl ColumnType {
    /// How `synthrank schema` shows the type.
    pub(crate) fn describe(self) -> String {
        match self {
            ColumnType::Vector => "FixedSizeList<Float32, DIM>".to_string(),
            ColumnType::Tokens => "List<Int32>".to_string(),
            other => other.arrow(None).to_string(),
        }
    }

    /// The Arrow type; `dim` sizes a vector column.
    pub fn arrow(self, dim: Option<i32>) -> DataType {
        match self {
            ColumnType::Vector => vector_type(dim.expect("a vector column needs its dimension")),
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Tokens => tokens_type(),
        }
    }
}

/// List<Int32>, the Arrow type of token id sequences.
pub(crate) fn tokens_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Int32, false)))
}

/// FixedSizeList<Float32> of `dim`, the Arrow type of embedding vectors.
pub(crate) fn vector_type(dim: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), dim)
}

impl TableSchema {
    /// The Arrow schema of a kind without vector columns.
    pub fn arrow(&self) -> SchemaRef {
        self.arrow_with_dim(None)
    }

    /// The Arrow schema, with vector columns of dimension `dim`.
    pub(crate) fn arrow_with_dim(&self, dim: Option<i32>) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.arrow(dim), c.nullable))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// The vector dimension a schema of this kind has (None when the kind has no vector).
    fn dim_of(&self, actual: &Schema) -> Option<i32> {
        let column = self
            .columns
            .iter()
            .find(|c| c.data_type == ColumnType::Vector)?;
        match actual.field_with_name(&column.name).ok()?.data_type() {
            DataType::FixedSizeList(_, n) => Some(*n),
            _ => None,
        }
    }

    /// Checks that `actual` has exactly this kind's columns, in order, with its types, and no
    /// nullable column where the kind forbids nulls.
    pub fn check(&self, actual: &Schema) -> Result<(), String> {
        let names: Vec<&str> = actual.fields().iter().map(|f| f.name().as_str()).collect();
        let expected: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        if names != expected {
            return Err(format!(
                "columns are [{}], a `{}` table has [{}]",
                names.join(", "),
                self.kind,
                expected.join(", ")
            ));
        }
        let dim = self.dim_of(actual).or(Some(0));
        for (column, field) in self.columns.iter().zip(actual.fields()) {
            let expected = column.data_type.arrow(dim);
            let same = match (field.data_type(), &expected) {
                // The item field's nullability of a vector does not matter.
                (DataType::FixedSizeList(a, n), DataType::FixedSizeList(b, m)) => {
                    n == m && a.data_type() == b.data_type()
                }
                (DataType::List(a), DataType::List(b)) => a.data_type() == b.data_type(),
                (a, b) => a == b,
            };
            if !same {
                return Err(format!(
                    "column `{}` has type {}, a `{}` table needs {}",
                    column.name,
                    field.data_type(),
                    self.kind,
                    expected
                ));
            }
            if field.is_nullable() && !column.nullable {
                return Err(format!(
                    "column `{}` is nullable, a `{}` table forbids nulls there",
                    column.name, self.kind
                ));
            }
        }
        Ok(())
    }
}

impl TableSchema {
    /// Reshapes rows computed elsewhere (by SQL) into this kind: its columns picked by name and
    /// in its order, cast to its types (SQL integer literals are Int64, say), nulls refused where
    /// the kind forbids them. Extra columns are dropped.
    pub(crate) fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        let options = CastOptions {
            safe: false,
            ..Default::default()
        };
        let dim = self.conform_dim(batch)?;
        let columns = self
            .columns
            .iter()
            .map(|spec| {
                let column = batch.column_by_name(&spec.name).ok_or_else(|| {
                    format!(
                        "has no column `{}` (a `{}` table needs it)",
                        spec.name, self.kind
                    )
                })?;
                let column: ArrayRef =
                    cast_with_options(column, &spec.data_type.arrow(dim), &options)
                        .map_err(|e| format!("column `{}`: {e}", spec.name))?;
                if !spec.nullable && column.null_count() > 0 {
                    let row = (0..column.len()).find(|&i| column.is_null(i)).unwrap_or(0);
                    return Err(format!(
                        "column `{}` is null in row {row}; a `{}` table forbids nulls there",
                        spec.name, self.kind
                    ));
                }
                Ok(column)
            })
            .collect::<Result<Vec<_>, String>>()?;
        RecordBatch::try_new(self.arrow_with_dim(dim), columns).map_err(|e| e.to_string())
    }

    /// The vector dimension rows computed elsewhere have: a fixed-size list's size, or the
    /// length of a variable list's first row (SQL `make_array` yields lists).
    fn conform_dim(&self, batch: &RecordBatch) -> Result<Option<i32>, String> {
        let Some(column) = self
            .columns
            .iter()
            .find(|c| c.data_type == ColumnType::Vector)
        else {
            return Ok(None);
        };
        let array = batch.column_by_name(&column.name).ok_or_else(|| {
            format!(
                "has no column `{}` (a `{}` table needs it)",
                column.name, self.kind
            )
        })?;
        match array.data_type() {
            DataType::FixedSizeList(_, n) => Ok(Some(*n)),
            DataType::List(_) => {
                let lists = arrow::array::as_list_array(array.as_ref());
                Ok(Some(if lists.is_empty() {
                    0
                } else {
                    lists.value_length(0)
                }))
            }
            other => Err(format!(
                "column `{}` has type {other}, a `{}` table needs a list of floats",
                column.name, self.kind
            )),
        }
    }
}

fn registry() -> &'static BTreeMap<String, TableSchema> {
    static REGISTRY: OnceLock<BTreeMap<String, TableSchema>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        SCHEMA_FILES
            .iter()
            .map(|(file, text)| {
                // The files are part of the build; a malformed one is a programming error that
                // the schema tests catch.
                let schema: TableSchema = serde_saphyr::from_str(text)
                    .unwrap_or_else(|e| panic!("schemas/{file}.yaml is invalid: {e}"));
                assert_eq!(&schema.kind, file, "schemas/{file}.yaml names another kind");
                (schema.kind.clone(), schema)
            })
            .collect()
    })
}

/// The schema of a table kind.
pub fn schema(kind: &str) -> Result<&'static TableSchema, TableError> {
    registry().get(kind).ok_or_else(|| TableError::UnknownKind {
        kind: kind.to_string(),
        known: kinds().join(", "),
    })
}

/// Every table kind, sorted.
pub fn kinds() -> Vec<&'static str> {
    registry().keys().map(String::as_str).collect()
}
