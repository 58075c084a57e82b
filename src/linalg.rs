//! Dense products on the CPU through the `gemm` crate: the kernels candle uses, chosen at run
//! time (AVX-512 where the CPU has it, AVX2+FMA elsewhere). The one place that calls them.

use candle_core::WithDType;

/// A matrix read in place from a slice: element (i, j) is `data[i * row_stride + j *
/// col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Strided<'a, T> {
    /// A row-major matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Strided {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        Strided {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn fits(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "{what} ({} x {}) reaches past its {} values",
                self.rows,
                self.cols,
                self.data.len()
            );
        }
    }
}

/// `out = a b` (row-major, `out_row_stride` apart), or `out += a b` when `accumulate`;
/// `threaded` spreads it over the current rayon pool.
pub fn product<T: WithDType>(
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    out: &mut [T],
    out_row_stride: usize,
    accumulate: bool,
    threaded: bool,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    a.fits("left operand");
    b.fits("right operand");
    assert!(out_row_stride >= b.cols, "output rows overlap");
    if a.rows > 0 && b.cols > 0 {
        assert!(
            (a.rows - 1) * out_row_stride + b.cols <= out.len(),
            "output rows reach past the buffer"
        );
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threaded && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let one = T::from_f64(1.0);
    // SAFETY: the checks above keep every element the three strided views name in bounds.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            out.as_mut_ptr(),
            1,
            out_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            one,
            one,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out = x W^T` (or `out += x W^T` when `accumulate`) for `x` (rows x inputs) and `W`
/// (outputs x inputs), all row-major, on the threads of the current rayon pool: a linear layer
/// reading its weights in place.
pub fn xwt<T: WithDType>(
    x: &[T],
    w: &[T],
    out: &mut [T],
    (rows, inputs, outputs): (usize, usize, usize),
    accumulate: bool,
) {
    let x = Strided::rows(x, rows, inputs);
    let w = Strided::rows(w, outputs, inputs).t();
    product(x, w, out, outputs, accumulate, true);
}
