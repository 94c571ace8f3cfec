//! Latency summaries shared by the boot bench and its plot.

/// Nearest-rank percentile (`p` in 0..=100) of sorted values: the smallest value with at
/// least p% of the values at or below it. With n = 30, p99 is the maximum.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// min, p25, p50, p90, p99, max (p25: where a bimodal latency's fast mode shows).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub p25: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(Summary {
            p25: percentile(&v, 25.0)?,
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }
    /// In the order of the boot report's columns.
    pub fn cells(&self) -> [f64; 6] {
        [self.min, self.p25, self.p50, self.p90, self.p99, self.max]
    }
}
