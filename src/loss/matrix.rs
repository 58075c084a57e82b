//! A small dense row-major f64 matrix: enough linear algebra for the losses (products,
//! transposes and a Jacobi SVD of a B x B matrix), without a linear-algebra dependency.

use std::ops::{Index, IndexMut};

#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_rows(rows: &[Vec<f64>]) -> Matrix {
        let cols = rows.first().map_or(0, Vec::len);
        assert!(rows.iter().all(|r| r.len() == cols), "ragged rows");
        Matrix {
            rows: rows.len(),
            cols,
            data: rows.concat(),
        }
    }

    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> Matrix {
        assert_eq!(data.len(), rows * cols);
        Matrix { rows, cols, data }
    }

    pub(crate) fn identity(n: usize) -> Matrix {
        let mut m = Matrix::zeros(n, n);
        for i in 0..n {
            m[(i, i)] = 1.0;
        }
        m
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &[f64] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f64] {
        &mut self.data
    }

    pub(crate) fn into_data(self) -> Vec<f64> {
        self.data
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub(crate) fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transpose(&self) -> Matrix {
        let mut t = Matrix::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t[(j, i)] = self[(i, j)];
            }
        }
        t
    }

    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let mut out = Matrix::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self[(i, k)];
                if a == 0.0 {
                    continue;
                }
                let row = other.row(k);
                for (o, b) in out.row_mut(i).iter_mut().zip(row) {
                    *o += a * b;
                }
            }
        }
        out
    }

    pub fn scale(mut self, s: f64) -> Matrix {
        self.data.iter_mut().for_each(|v| *v *= s);
        self
    }

    pub(crate) fn sub(&self, other: &Matrix) -> Matrix {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        let data = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| a - b)
            .collect();
        Matrix::from_vec(self.rows, self.cols, data)
    }

    pub(crate) fn squared_norm(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum()
    }

    /// Singular value decomposition of a square matrix by one-sided Jacobi rotations:
    /// `self = U diag(s) V^T`. Accurate to working precision for the small (B x B) matrices the
    /// Wasserstein loss needs. Columns of U for zero singular values are left zero.
    pub fn svd(&self) -> (Matrix, Vec<f64>, Matrix) {
        assert_eq!(self.rows, self.cols, "square matrices only");
        let n = self.rows;
        let mut a = self.clone();
        let mut v = Matrix::identity(n);
        for _sweep in 0..60 {
            let mut rotated = false;
            for p in 0..n {
                for q in p + 1..n {
                    let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                    for i in 0..n {
                        let (x, y) = (a[(i, p)], a[(i, q)]);
                        alpha += x * x;
                        beta += y * y;
                        gamma += x * y;
                    }
                    if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                        continue;
                    }
                    rotated = true;
                    let zeta = (beta - alpha) / (2.0 * gamma);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let t = if zeta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let s = c * t;
                    for m in [&mut a, &mut v] {
                        for i in 0..n {
                            let (x, y) = (m[(i, p)], m[(i, q)]);
                            m[(i, p)] = c * x - s * y;
                            m[(i, q)] = s * x + c * y;
                        }
                    }
                }
            }
            if !rotated {
                break;
            }
        }
        let norms: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| a[(i, j)] * a[(i, j)]).sum::<f64>().sqrt())
            .collect();
        let largest = norms.iter().copied().fold(0.0, f64::max);
        let mut u = Matrix::zeros(n, n);
        for (j, &s) in norms.iter().enumerate() {
            if s > largest * 1e-14 && s > 0.0 {
                for i in 0..n {
                    u[(i, j)] = a[(i, j)] / s;
                }
            }
        }
        (u, norms, v)
    }
}

impl Index<(usize, usize)> for Matrix {
    type Output = f64;
    fn index(&self, (i, j): (usize, usize)) -> &f64 {
        &self.data[i * self.cols + j]
    }
}

impl IndexMut<(usize, usize)> for Matrix {
    fn index_mut(&mut self, (i, j): (usize, usize)) -> &mut f64 {
        &mut self.data[i * self.cols + j]
    }
}
