use std::fs::File;
use std::path::Path;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{FormatError, Position, Row, Rows};

/// Rows of a Parquet file: the named `columns`, in order, each cast to a string. A column in
/// `optional` that the file lacks reads as empty strings.
pub fn parquet_rows(
    path: &Path,
    columns: &[String],
    optional: &[String],
) -> Result<Rows, FormatError> {
    let file = File::open(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| file_error(path, e.to_string()))?;
    let indices = column_indices(path, builder.schema(), columns, optional)?;
    let mut projected: Vec<usize> = indices.iter().flatten().copied().collect();
    projected.sort_unstable();
    projected.dedup();
    let mask = ProjectionMask::roots(builder.parquet_schema(), projected.clone());
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| file_error(path, e.to_string()))?;
    let owned = path.to_path_buf();
    let mut row_number = 0u64;
    Ok(Box::new(reader.flat_map(move |batch| {
        let strings = batch
            .map_err(|e| file_error(&owned, e.to_string()))
            .and_then(|batch| string_columns(&owned, &batch, &indices, &projected));
        let strings = match strings {
            Ok(strings) => strings,
            Err(e) => return vec![Err(e)],
        };
        let rows = strings.first().map_or(0, |(rows, _)| *rows);
        (0..rows)
            .map(|r| {
                row_number += 1;
                let at = Position::Row(row_number);
                let fields = strings
                    .iter()
                    .map(|(_, array)| match array {
                        None => Ok(String::new()),
                        Some(a) if a.is_null(r) => {
                            Err(FormatError::record(&owned, at, "null value"))
                        }
                        Some(a) => Ok(a.value(r).to_string()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Row { at, fields })
            })
            .collect::<Vec<_>>()
    })))
}

fn file_error(path: &Path, message: String) -> FormatError {
    FormatError::File {
        path: path.to_path_buf(),
        message,
    }
}

/// The file column of each named column (`None`: optional and absent).
fn column_indices(
    path: &Path,
    schema: &Schema,
    columns: &[String],
    optional: &[String],
) -> Result<Vec<Option<usize>>, FormatError> {
    columns
        .iter()
        .map(|name| match schema.index_of(name) {
            Ok(i) => Ok(Some(i)),
            Err(_) if optional.contains(name) => Ok(None),
            Err(_) => {
                let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                Err(file_error(
                    path,
                    format!("no column `{name}` (columns: {})", found.join(", ")),
                ))
            }
        })
        .collect()
}

/// The batch's named columns as strings, each with the batch's row count.
fn string_columns(
    path: &Path,
    batch: &RecordBatch,
    indices: &[Option<usize>],
    projected: &[usize],
) -> Result<Vec<(usize, Option<StringArray>)>, FormatError> {
    indices
        .iter()
        .map(|index| {
            let array = index
                .map(|i| {
                    let position = projected.binary_search(&i).expect("projected");
                    cast(batch.column(position), &DataType::Utf8)
                        .map(|a| {
                            a.as_any()
                                .downcast_ref::<StringArray>()
                                .expect("utf8")
                                .clone()
                        })
                        .map_err(|e| file_error(path, e.to_string()))
                })
                .transpose()?;
            Ok((batch.num_rows(), array))
        })
        .collect()
}
