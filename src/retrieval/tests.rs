//! Exact search agrees with brute force, ties included, for every kernel this CPU has (so
//! the narrower classes' code paths run here too), any blocking, chunking and thread count.

use rand::{Rng, SeedableRng};

use super::*;

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
                    score: dot(&q[i * dim..(i + 1) * dim], &d[j * dim..(j + 1) * dim]) + 0.0,
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

/// Every kernel this CPU has returns the brute-force top k.
fn assert_search_equals_brute_force(
    q: &[f32],
    d: &[f32],
    dim: usize,
    ids: &[String],
    exclude: &[Option<u32>],
    options: SearchOptions,
    trial: usize,
) {
    let want = brute_force(q, d, dim, ids, options.k, exclude);
    let (nq, nd) = (q.len() / dim, d.len() / dim);
    for kernel in Kernel::available() {
        let got = search_with_kernel(
            kernel,
            Vectors { data: q, dim },
            Vectors { data: d, dim },
            &id_ranks(ids),
            exclude,
            options,
            &|_| {},
        )
        .unwrap();
        assert_eq!(
            got, want,
            "{kernel:?}, trial {trial}: nq={nq} nd={nd} dim={dim} {options:?}"
        );
    }
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
