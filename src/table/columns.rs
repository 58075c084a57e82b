//! Building Arrow columns from Rust values, and reading typed columns back, for stages that
//! turn rows into tables of a known kind and back.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};

pub(crate) fn utf8<'a>(values: impl IntoIterator<Item = &'a str>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<StringArray>())
}

pub(crate) fn nullable_utf8<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<StringArray>())
}

pub(crate) fn int32(values: impl IntoIterator<Item = i32>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<Int32Array>())
}

pub(crate) fn nullable_int32(values: impl IntoIterator<Item = Option<i32>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<Int32Array>())
}

pub(crate) fn int64(values: impl IntoIterator<Item = i64>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<Int64Array>())
}

pub fn float64(values: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<Float64Array>())
}

pub(crate) fn nullable_float64(values: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<Float64Array>())
}

/// The column `name` of a batch that was conformed to its table kind, as its Arrow type.
/// Panics if the batch does not have it: conforming guarantees it, so that is a bug.
pub fn get<'a, T: Array + 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .unwrap_or_else(|| {
            panic!("column `{name}` of the expected type (the batch was conformed to its kind)")
        })
}

/// A List<Int32> column of token id sequences.
pub fn tokens<'a>(values: impl IntoIterator<Item = &'a [u32]>) -> ArrayRef {
    let mut builder =
        arrow::array::ListBuilder::new(arrow::array::Int32Builder::new()).with_field(Arc::new(
            arrow::datatypes::Field::new("item", arrow::datatypes::DataType::Int32, false),
        ));
    for seq in values {
        builder
            .values()
            .append_slice(&seq.iter().map(|&t| t as i32).collect::<Vec<i32>>());
        builder.append(true);
    }
    Arc::new(builder.finish())
}

/// A FixedSizeList<Float32> column of `dim`-sized vectors from row-major values.
pub fn vectors(values: Vec<f32>, dim: usize) -> ArrayRef {
    let field = Arc::new(arrow::datatypes::Field::new(
        "item",
        arrow::datatypes::DataType::Float32,
        false,
    ));
    Arc::new(arrow::array::FixedSizeListArray::new(
        field,
        dim as i32,
        Arc::new(arrow::array::Float32Array::from(values)),
        None,
    ))
}
