//! Measure names, as trec_eval spells them on the command line (`ndcg_cut.10`, `P.5`) and as
//! pytrec_eval reports them (`ndcg_cut_10`, `P_5`).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    Ndcg,
    NdcgCut(usize),
    Map,
    MapCut(usize),
    RecipRank,
    /// Reciprocal rank counting only the top k (MS MARCO's MRR@10).
    MrrCut(usize),
    Precision(usize),
    Recall(usize),
    Success(usize),
    Rprec,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown measure `{0}` (known: ndcg, ndcg_cut.K, map, map_cut.K, recip_rank, mrr_cut.K, P.K, recall.K, success.K, Rprec; several cutoffs as ndcg_cut.5,10)"
)]
pub struct MeasureError(pub String);

impl Measure {
    /// The name results are reported under (pytrec_eval's).
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// Parses one trec_eval measure spec, which may list several cutoffs (`P.5,10`).
    pub fn parse_list(spec: &str) -> Result<Vec<Measure>, MeasureError> {
        let spec = spec.trim();
        let err = || MeasureError(spec.to_string());
        const WITH_CUTOFF: [&str; 6] = ["ndcg_cut", "map_cut", "mrr_cut", "P", "recall", "success"];
        let (family, cutoffs) = match spec.rsplit_once('.') {
            Some((f, rest)) => (f, Some(rest)),
            None => WITH_CUTOFF
                .iter()
                .find_map(|f| {
                    let rest = spec.strip_prefix(f)?.strip_prefix('_')?;
                    rest.starts_with(|c: char| c.is_ascii_digit())
                        .then_some((*f, Some(rest)))
                })
                .unwrap_or((spec, None)),
        };
        let build = |k: Option<usize>| -> Result<Measure, MeasureError> {
            Ok(match (family, k) {
                ("ndcg", None) => Measure::Ndcg,
                ("map", None) => Measure::Map,
                ("recip_rank", None) => Measure::RecipRank,
                ("Rprec", None) => Measure::Rprec,
                ("ndcg_cut", Some(k)) => Measure::NdcgCut(k),
                ("map_cut", Some(k)) => Measure::MapCut(k),
                ("mrr_cut", Some(k)) => Measure::MrrCut(k),
                ("P", Some(k)) => Measure::Precision(k),
                ("recall", Some(k)) => Measure::Recall(k),
                ("success", Some(k)) => Measure::Success(k),
                _ => return Err(err()),
            })
        };
        match cutoffs {
            None => Ok(vec![build(None)?]),
            Some(list) => list
                .split(',')
                .map(|k| match k.trim().parse::<usize>() {
                    Ok(k) if k > 0 => build(Some(k)),
                    _ => Err(err()),
                })
                .collect(),
        }
    }
}

impl FromStr for Measure {
    type Err = MeasureError;
    fn from_str(s: &str) -> Result<Measure, MeasureError> {
        match Measure::parse_list(s)?.as_slice() {
            [one] => Ok(*one),
            _ => Err(MeasureError(s.to_string())),
        }
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Measure::Ndcg => write!(f, "ndcg"),
            Measure::NdcgCut(k) => write!(f, "ndcg_cut_{k}"),
            Measure::Map => write!(f, "map"),
            Measure::MapCut(k) => write!(f, "map_cut_{k}"),
            Measure::RecipRank => write!(f, "recip_rank"),
            Measure::MrrCut(k) => write!(f, "mrr_cut_{k}"),
            Measure::Precision(k) => write!(f, "P_{k}"),
            Measure::Recall(k) => write!(f, "recall_{k}"),
            Measure::Success(k) => write!(f, "success_{k}"),
            Measure::Rprec => write!(f, "Rprec"),
        }
    }
}
