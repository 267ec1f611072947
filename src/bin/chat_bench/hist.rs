//! Latency recording: a log-linear histogram (under 1 % error) and a per-thread
//! registry so that receive loops record without contention.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;

/// Sub-buckets per power of two (the first 128 values are exact).
const SUB: u64 = 64;
/// Number of buckets needed for any `u64`.
const BUCKETS: usize = 58 * SUB as usize + 2 * SUB as usize;

/// A log-linear histogram of nanosecond values.
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist { counts: vec![0; BUCKETS], count: 0, sum: 0, max: 0 }
    }
}

fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as u64; // >= 7
    let shift = e - 6;
    (shift * SUB + (v >> shift)) as usize
}

fn value_of(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < 2 * SUB {
        return idx;
    }
    let shift = idx / SUB - 1;
    let m = idx % SUB + SUB;
    (m << shift) + ((1u64 << shift) >> 1)
}

impl Hist {
    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += v as u128;
        if v > self.max {
            self.max = v;
        }
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Hist) {
        if other.count == 0 {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), approximately.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_of(i).min(self.max);
            }
        }
        self.max
    }

    /// Largest recorded value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean of the recorded values.
    pub fn mean(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            (self.sum / self.count as u128) as u64
        }
    }
}

/// Latency summary in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(h: &Hist) -> Summary {
        let ms = |ns: u64| ns as f64 / 1e6;
        Summary {
            count: h.count(),
            p50: ms(h.quantile(0.50)),
            p90: ms(h.quantile(0.90)),
            p99: ms(h.quantile(0.99)),
            p999: ms(h.quantile(0.999)),
            max: ms(h.max()),
            mean: ms(h.mean()),
        }
    }
}

static START: OnceLock<Instant> = OnceLock::new();

/// Fixes the process-wide time origin (call early in `main`).
pub fn init_clock() {
    START.get_or_init(Instant::now);
}

/// Monotonic nanoseconds since the process-wide origin.
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

static REGISTRY: Mutex<Vec<Arc<Mutex<Hist>>>> = parking_lot::const_mutex(Vec::new());

thread_local! {
    static LOCAL: Arc<Mutex<Hist>> = {
        let h = Arc::new(Mutex::new(Hist::default()));
        REGISTRY.lock().push(h.clone());
        h
    };
}

/// Runs `f` with this thread's histogram of delivery latencies.
pub fn with_local<R>(f: impl FnOnce(&mut Hist) -> R) -> R {
    LOCAL.with(|h| f(&mut h.lock()))
}

/// Merges every thread's delivery histogram and resets them.
pub fn take_all() -> Hist {
    let mut total = Hist::default();
    for h in REGISTRY.lock().iter() {
        let mut g = h.lock();
        total.merge(&g);
        *g = Hist::default();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let mut h = Hist::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert_eq!(h.max(), 100_000_000);
        for v in [0u64, 1, 127, 128, 129, 255, 256, 1 << 40, u64::MAX] {
            let i = index(v);
            assert!(i < BUCKETS);
            let back = value_of(i) as f64;
            assert!(v < 128 || (back / v as f64 - 1.0).abs() < 0.02, "{v} {back}");
        }
    }
}
