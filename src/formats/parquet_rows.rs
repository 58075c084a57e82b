use std::fs::File;
use std::path::Path;

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
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
    let file_error = |message: String| FormatError::File {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| file_error(e.to_string()))?;
    let schema = builder.schema().clone();
    let mut indices = Vec::new();
    for name in columns {
        match schema.index_of(name) {
            Ok(i) => indices.push(Some(i)),
            Err(_) if optional.contains(name) => indices.push(None),
            Err(_) => {
                let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(file_error(format!(
                    "no column `{name}` (columns: {})",
                    found.join(", ")
                )));
            }
        }
    }
    let mut projected: Vec<usize> = indices.iter().flatten().copied().collect();
    projected.sort_unstable();
    projected.dedup();
    let mask = ProjectionMask::roots(builder.parquet_schema(), projected.clone());
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| file_error(e.to_string()))?;
    let owned = path.to_path_buf();
    let mut row_number = 0u64;
    Ok(Box::new(reader.flat_map(move |batch| {
        let rows: Vec<Result<Row, FormatError>> = match batch {
            Err(e) => vec![Err(FormatError::File {
                path: owned.clone(),
                message: e.to_string(),
            })],
            Ok(batch) => {
                let strings: Result<Vec<Option<StringArray>>, FormatError> = indices
                    .iter()
                    .map(|index| {
                        index
                            .map(|i| {
                                let position = projected.binary_search(&i).expect("projected");
                                cast(batch.column(position), &DataType::Utf8)
                                    .map(|a| {
                                        a.as_any()
                                            .downcast_ref::<StringArray>()
                                            .expect("utf8")
                                            .clone()
                                    })
                                    .map_err(|e| FormatError::File {
                                        path: owned.clone(),
                                        message: e.to_string(),
                                    })
                            })
                            .transpose()
                    })
                    .collect();
                match strings {
                    Err(e) => vec![Err(e)],
                    Ok(strings) => (0..batch.num_rows())
                        .map(|r| {
                            row_number += 1;
                            let at = Position::Row(row_number);
                            let fields = strings
                                .iter()
                                .map(|array| match array {
                                    None => Ok(String::new()),
                                    Some(a) if a.is_null(r) => {
                                        Err(FormatError::record(&owned, at, "null value"))
                                    }
                                    Some(a) => Ok(a.value(r).to_string()),
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            Ok(Row { at, fields })
                        })
                        .collect(),
                }
            }
        };
        rows
    })))
}
