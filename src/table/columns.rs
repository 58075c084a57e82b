//! Building Arrow columns from Rust values, and reading typed columns back, for stages that
//! turn rows into tables of a known kind and back.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};

pub fn utf8<'a>(values: impl IntoIterator<Item = &'a str>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<StringArray>())
}

pub fn nullable_utf8<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<StringArray>())
}

pub fn int32(values: impl IntoIterator<Item = i32>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<Int32Array>())
}

pub fn nullable_int32(values: impl IntoIterator<Item = Option<i32>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<Int32Array>())
}

pub fn int64(values: impl IntoIterator<Item = i64>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<Int64Array>())
}

pub fn float64(values: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<Float64Array>())
}

pub fn nullable_float64(values: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
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
