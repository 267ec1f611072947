//! The pacer's write budget: how many writes per second all streams together may make.
//!
//! A budget is a fixed number, or a range (the default) in which the pacer moves with the
//! machine's load: every [`SAMPLE`] it reads how busy the machine's CPUs were since the
//! last look (`/proc/stat`), and raises the budget by a sixteenth while they were under
//! [`RAISE_BELOW`] percent busy on average, or cuts it by an eighth while they were over
//! [`CUT_ABOVE`] (the average halves the weight of each older sample, so that the budget
//! does not swing with every sample). More writes carry fewer events each, so a server
//! with cores to spare spends them on latency (a shorter interval), and a busy machine
//! gets batches large enough to keep up. A sample over [`SATURATED`] cuts a quarter at
//! once: a burst after a quiet spell finds the budget at its highest, and must not fall
//! behind while it comes down. Measured in BENCHMARKS.md ("An adaptive write budget").
//! A new server is a server after a quiet spell: its budget starts at the highest, where an
//! idle machine's samples would take it within two seconds anyway ("The budget starts at
//! its highest"). Where the CPU times cannot be read the budget falls to its lowest at the
//! first sample, and is not sampled again.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How often the budget is looked at.
pub const SAMPLE: Duration = Duration::from_millis(100);

/// Average busy share of the machine's CPU time (percent) under which the budget rises.
pub const RAISE_BELOW: u64 = 70;

/// Average busy share of the machine's CPU time (percent) over which the budget is cut.
pub const CUT_ABOVE: u64 = 80;

/// Busy share (percent) in one sample over which the budget is cut by a quarter at once.
pub const SATURATED: u64 = 90;

/// Writes per second one pacer thread is given before a tick's streams are shared with a
/// helper thread (one thread tops out at about 60 k on a 2-core machine).
pub const WRITES_PER_THREAD: u32 = 40_000;

/// Writes per second over all streams: `min == max` is a fixed budget, `0` no pacing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteBudget {
    /// The least it is cut to (and where it stays if the CPU times cannot be read).
    pub min: u32,
    /// Where it starts, and the most it is raised to.
    pub max: u32,
}

impl WriteBudget {
    /// A budget that does not move.
    pub const fn fixed(writes_per_second: u32) -> WriteBudget {
        WriteBudget { min: writes_per_second, max: writes_per_second }
    }

    /// True if the budget moves with the machine's load.
    pub fn adapts(&self) -> bool {
        self.min < self.max
    }
}

impl Default for WriteBudget {
    fn default() -> Self {
        WriteBudget { min: 35_000, max: 100_000 }
    }
}

impl fmt::Display for WriteBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.adapts() {
            write!(f, "{}..{}", self.min, self.max)
        } else {
            write!(f, "{}", self.min)
        }
    }
}

impl FromStr for WriteBudget {
    type Err = String;

    /// `N` (fixed; 0 = unpaced) or `MIN..MAX`, with `0 < MIN <= MAX`.
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |n: &str| n.trim().parse::<u32>().map_err(|e| format!("{n:?}: {e}"));
        match s.split_once("..") {
            None => Ok(WriteBudget::fixed(number(s)?)),
            Some((min, max)) => {
                let budget = WriteBudget { min: number(min)?, max: number(max)? };
                if budget.min == 0 || budget.min > budget.max {
                    return Err(format!("{s:?}: a range needs 0 < MIN <= MAX"));
                }
                Ok(budget)
            }
        }
    }
}

/// How many threads share a tick's writes at `writes_per_second`, of `threads` there are:
/// one per [`WRITES_PER_THREAD`] begun.
pub fn threads_for(writes_per_second: u32, threads: usize) -> usize {
    let wanted = writes_per_second.div_ceil(WRITES_PER_THREAD).max(1);
    usize::try_from(wanted).unwrap_or(usize::MAX).min(threads.max(1))
}

/// The machine's CPU time so far, in clock ticks over all CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time spent running anything (user, system, interrupts, stolen by a hypervisor).
    pub busy: u64,
    /// Busy plus idle time.
    pub total: u64,
}

impl CpuTimes {
    /// Parses the summary line of `/proc/stat`: `cpu user nice system idle iowait irq
    /// softirq steal ...` (guest time is already counted in user).
    pub fn parse(line: &str) -> Option<CpuTimes> {
        let mut fields = line.split_ascii_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let n: Vec<u64> = fields.take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = n[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq + steal;
        Some(CpuTimes { busy, total: busy + idle + iowait })
    }

    /// Reads this machine's CPU times; `None` where there is no `/proc/stat`.
    pub fn read() -> Option<CpuTimes> {
        use std::io::BufRead;
        let file = std::fs::File::open("/proc/stat").ok()?;
        let mut line = String::new();
        std::io::BufReader::new(file).read_line(&mut line).ok()?;
        CpuTimes::parse(&line)
    }
}

/// Moves a budget with the machine's load, one sample at a time (no clock, no I/O: the
/// pacer thread feeds it what [`CpuTimes::read`] saw every [`SAMPLE`]).
#[derive(Debug)]
pub struct Governor {
    budget: WriteBudget,
    now: u32,
    last: Option<CpuTimes>,
    /// Busy percent, each sample averaged with the average before it.
    average: Option<u64>,
    /// A sample found no CPU times: the budget stays at its lowest, and takes no more.
    blind: bool,
}

impl Governor {
    /// A governor at the budget's highest: a new server has had no load, and samples on an
    /// idle machine would raise it there within two seconds (from the lowest, 35 k, to
    /// 100 k takes 18 samples); a load that arrives at once cuts it within a few samples.
    pub fn new(budget: WriteBudget) -> Governor {
        Governor { budget, now: budget.max, last: None, average: None, blind: false }
    }

    /// Writes per second allowed now.
    pub fn writes_per_second(&self) -> u32 {
        self.now
    }

    /// True while samples can move the budget: it adapts, and the CPU times could be read.
    pub fn takes_samples(&self) -> bool {
        self.budget.adapts() && !self.blind
    }

    /// True while a sample could raise the budget (it takes samples and is below its top):
    /// an idle pacer then still wakes for them, so that a burst finds the budget raised.
    pub fn may_rise(&self) -> bool {
        self.takes_samples() && self.now < self.budget.max
    }

    /// Takes the CPU times seen now and returns the budget until the next sample: cut by
    /// a quarter if the CPUs were over [`SATURATED`] percent busy since the last sample;
    /// else raised by a sixteenth if their average is under [`RAISE_BELOW`], cut by an
    /// eighth if over [`CUT_ABOVE`], the same otherwise (and on the first sample, or when
    /// the counters did not move). `None` (no CPU times to read) puts the budget at its
    /// lowest for good, and [`Governor::takes_samples`] false.
    pub fn handle_sample(&mut self, times: Option<CpuTimes>) -> u32 {
        let Some(times) = times.filter(|_| !self.blind) else {
            self.blind = true;
            self.now = self.budget.min;
            return self.now;
        };
        let Some(last) = self.last.replace(times) else { return self.now };
        let total = times.total.saturating_sub(last.total);
        let busy = times.busy.saturating_sub(last.busy);
        if total == 0 {
            return self.now;
        }
        let percent = busy * 100 / total;
        let average = self.average.map_or(percent, |a| (a + percent) / 2);
        self.average = Some(average);
        let now = u64::from(self.now);
        let next = if percent > SATURATED {
            now - now / 4
        } else if average > CUT_ABOVE {
            now - now / 8
        } else if average < RAISE_BELOW {
            now + now / 16
        } else {
            now
        };
        let (min, max) = (u64::from(self.budget.min), u64::from(self.budget.max));
        self.now = u32::try_from(next.clamp(min, max)).expect("clamped to a u32 range");
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_as_a_number_or_a_range() {
        assert_eq!("35000".parse(), Ok(WriteBudget::fixed(35_000)));
        assert_eq!("0".parse(), Ok(WriteBudget::fixed(0)));
        assert_eq!("35000..100000".parse(), Ok(WriteBudget { min: 35_000, max: 100_000 }));
        assert_eq!("5..5".parse::<WriteBudget>().map(|b| b.adapts()), Ok(false));
        for bad in ["", "x", "100..50", "0..10", "10..", "-5", "1..2..3"] {
            assert!(bad.parse::<WriteBudget>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(WriteBudget::default().to_string(), "35000..100000");
        assert_eq!(WriteBudget::fixed(7).to_string(), "7");
    }

    #[test]
    fn the_proc_stat_summary_line_gives_busy_and_total_time() {
        let line = "cpu  4710483 10 1612422 3758279 32553 5 170974 10515 7 0\n";
        let busy = 4_710_483 + 10 + 1_612_422 + 5 + 170_974 + 10_515;
        assert_eq!(CpuTimes::parse(line), Some(CpuTimes { busy, total: busy + 3_758_279 + 32_553 }));
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8"), None, "a single CPU's line");
        assert_eq!(CpuTimes::parse("cpu 1 2 3"), None, "too few fields");
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5 6 7 8"), None);
    }

    /// CPU times `busy_percent` busy over `ticks` more clock ticks than `last`.
    fn after(last: CpuTimes, busy_percent: u64, ticks: u64) -> CpuTimes {
        CpuTimes { busy: last.busy + ticks * busy_percent / 100, total: last.total + ticks }
    }

    #[test]
    fn the_budget_starts_at_its_highest_falls_when_the_cpus_are_busy_and_rises_when_they_are_not() {
        let budget = WriteBudget { min: 35_000, max: 100_000 };
        let mut governor = Governor::new(budget);
        assert_eq!(governor.writes_per_second(), 100_000, "a new server starts at the top");
        assert!(governor.takes_samples() && !governor.may_rise(), "at the top, samples can only cut it");
        let mut times = CpuTimes { busy: 1000, total: 5000 };
        assert_eq!(governor.handle_sample(Some(times)), 100_000, "nothing to compare the first sample with");
        // Saturated: a quarter each sample, to the least.
        let mut seen = Vec::new();
        for _ in 0..5 {
            times = after(times, 95, 20);
            seen.push(governor.handle_sample(Some(times)));
        }
        assert_eq!(seen, [75_000, 56_250, 42_188, 35_000, 35_000], "down by a quarter, to the least");
        assert!(governor.may_rise());
        // Half busy: the average (95 before) is 72 after the first sample, then under 70.
        seen.clear();
        for _ in 0..20 {
            times = after(times, 50, 20);
            seen.push(governor.handle_sample(Some(times)));
        }
        assert_eq!(seen[..5], [35_000, 37_187, 39_511, 41_980, 44_603], "then up by a sixteenth");
        assert!(seen.windows(2).all(|w| w[0] < w[1] || w[1] == 100_000), "{seen:?}");
        assert_eq!(seen[17..], [98_083, 100_000, 100_000], "to the most");
        assert!(!governor.may_rise());
        // Busier: the average (50 before) crosses 80 on the fourth sample.
        seen.clear();
        for _ in 0..5 {
            times = after(times, 85, 20);
            seen.push(governor.handle_sample(Some(times)));
        }
        assert_eq!(
            seen,
            [100_000, 100_000, 100_000, 87_500, 76_563],
            "averages 67, 76, 80, then 82: down by an eighth"
        );
        assert_eq!(governor.handle_sample(Some(times)), 76_563, "counters that did not move change nothing");
        assert_eq!(governor.writes_per_second(), 76_563);
    }

    #[test]
    fn without_cpu_times_the_budget_falls_to_its_lowest_and_takes_no_more_samples() {
        let mut governor = Governor::new(WriteBudget { min: 35_000, max: 100_000 });
        let mut times = CpuTimes { busy: 0, total: 0 };
        for _ in 0..4 {
            times = after(times, 10, 100);
            governor.handle_sample(Some(times));
        }
        assert_eq!(governor.writes_per_second(), 100_000);
        assert!(governor.takes_samples());
        assert_eq!(governor.handle_sample(None), 35_000, "down to the lowest");
        assert!(!governor.takes_samples() && !governor.may_rise(), "an idle pacer need not wake for samples");
        times = after(times, 10, 100);
        assert_eq!(governor.handle_sample(Some(times)), 35_000, "later times are not used");
    }

    #[test]
    fn between_the_marks_the_budget_stays() {
        let mut governor = Governor::new(WriteBudget { min: 10_000, max: 90_000 });
        let mut times = CpuTimes { busy: 0, total: 0 };
        governor.handle_sample(Some(times));
        // Away from both ends first, so that a rise or a cut would show.
        times = after(times, 95, 100);
        assert_eq!(governor.handle_sample(Some(times)), 67_500, "saturated: down by a quarter");
        times = after(times, 65, 100);
        assert_eq!(governor.handle_sample(Some(times)), 67_500, "average 80: not over it");
        for percent in [75, 72, 78, 75, 79, 71] {
            times = after(times, percent, 100);
            assert_eq!(governor.handle_sample(Some(times)), 67_500, "{percent} % busy");
        }
    }

    #[test]
    fn a_fixed_budget_does_not_move() {
        let mut governor = Governor::new(WriteBudget::fixed(50_000));
        assert!(!governor.takes_samples() && !governor.may_rise());
        let mut times = CpuTimes { busy: 0, total: 0 };
        for percent in [0, 10, 100, 100, 0] {
            times = after(times, percent, 100);
            assert_eq!(governor.handle_sample(Some(times)), 50_000);
        }
    }

    #[test]
    fn one_thread_writes_per_40k_begun_up_to_the_threads_there_are() {
        let cases =
            [(0, 3, 1), (40_000, 3, 1), (40_001, 3, 2), (80_000, 3, 2), (100_000, 3, 3), (100_000, 2, 2)];
        for (writes, threads, expected) in cases {
            assert_eq!(threads_for(writes, threads), expected, "{writes} writes/s, {threads} threads");
        }
        assert_eq!(threads_for(1_000_000, 0), 1);
    }

    #[test]
    fn the_cpu_times_of_this_machine_can_be_read_where_there_is_proc_stat() {
        if std::path::Path::new("/proc/stat").exists() {
            let times = CpuTimes::read().expect("/proc/stat has a summary line");
            assert!(times.busy <= times.total && times.total > 0, "{times:?}");
        }
    }
}
