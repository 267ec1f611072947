//! Results as one ordered tree, printed as a table or as JSON; and the progress line.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hist::Summary;

/// A JSON-like value that keeps key order.
#[derive(Clone, Debug)]
pub enum Val {
    Int(i64),
    Num(f64),
    Str(String),
    Bool(bool),
    Obj(Vec<(String, Val)>),
    Arr(Vec<Val>),
}

/// Integer counts and sizes become `Val::Int` (they stay far below `i64::MAX`).
macro_rules! int_val {
    ($($t:ty),*) => {$(
        impl From<$t> for Val {
            fn from(v: $t) -> Val {
                Val::Int(v as i64)
            }
        }
    )*};
}
int_val!(u64, usize, i64, u32);

impl From<f64> for Val {
    fn from(v: f64) -> Val {
        Val::Num(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Val {
        Val::Bool(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Str(v.to_string())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Str(v)
    }
}
impl From<Obj> for Val {
    fn from(v: Obj) -> Val {
        Val::Obj(v.0)
    }
}

/// Builder for an ordered object.
#[derive(Clone, Debug, Default)]
pub struct Obj(pub Vec<(String, Val)>);

impl Obj {
    pub fn new() -> Obj {
        Obj(Vec::new())
    }
    pub fn set(mut self, k: &str, v: impl Into<Val>) -> Obj {
        self.0.push((k.to_string(), v.into()));
        self
    }
    pub fn push(&mut self, k: &str, v: impl Into<Val>) {
        self.0.push((k.to_string(), v.into()));
    }
}

/// A latency summary as an object (milliseconds).
pub fn latency(s: &Summary) -> Obj {
    let r = |v: f64| (v * 1000.0).round() / 1000.0;
    Obj::new()
        .set("count", s.count)
        .set("p50_ms", r(s.p50))
        .set("p90_ms", r(s.p90))
        .set("p99_ms", r(s.p99))
        .set("p999_ms", r(s.p999))
        .set("max_ms", r(s.max))
        .set("mean_ms", r(s.mean))
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json(out: &mut String, v: &Val, indent: usize) {
    let pad = "  ".repeat(indent + 1);
    match v {
        Val::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Val::Num(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        Val::Num(_) => out.push_str("null"),
        Val::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Val::Str(s) => json_str(out, s),
        Val::Arr(items) => {
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&pad);
                json(out, it, indent + 1);
            }
            if !items.is_empty() {
                out.push('\n');
                out.push_str(&"  ".repeat(indent));
            }
            out.push(']');
        }
        Val::Obj(fields) => {
            out.push('{');
            for (i, (k, it)) in fields.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&pad);
                json_str(out, k);
                out.push_str(": ");
                json(out, it, indent + 1);
            }
            if !fields.is_empty() {
                out.push('\n');
                out.push_str(&"  ".repeat(indent));
            }
            out.push('}');
        }
    }
}

/// The report as pretty JSON.
pub fn to_json(report: &Obj) -> String {
    let mut out = String::new();
    json(&mut out, &Val::Obj(report.0.clone()), 0);
    out.push('\n');
    out
}

fn scalar(v: &Val) -> String {
    match v {
        Val::Int(i) => {
            // Thousands separators make big counts readable.
            let s = i.unsigned_abs().to_string();
            let mut o = String::new();
            for (n, c) in s.chars().enumerate() {
                if n > 0 && (s.len() - n) % 3 == 0 {
                    o.push('_');
                }
                o.push(c);
            }
            if *i < 0 {
                format!("-{o}")
            } else {
                o
            }
        }
        Val::Num(f) if f.abs() >= 100.0 => format!("{f:.0}"),
        Val::Num(f) => format!("{f:.3}"),
        Val::Bool(b) => b.to_string(),
        Val::Str(s) => s.clone(),
        Val::Obj(_) | Val::Arr(_) => String::new(),
    }
}

fn table(out: &mut String, fields: &[(String, Val)], indent: usize) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in fields {
        let pad = "  ".repeat(indent);
        match v {
            Val::Obj(inner) => {
                let _ = writeln!(out, "{pad}{k}:");
                table(out, inner, indent + 1);
            }
            Val::Arr(items) => {
                let _ = writeln!(out, "{pad}{k}:");
                for (i, it) in items.iter().enumerate() {
                    match it {
                        Val::Obj(inner) => {
                            // One row per element: "k=v k=v".
                            let row: Vec<String> = inner
                                .iter()
                                .filter(|(_, v)| !matches!(v, Val::Obj(_) | Val::Arr(_)))
                                .map(|(k, v)| format!("{k}={}", scalar(v)))
                                .collect();
                            let _ = writeln!(out, "{pad}  [{i}] {}", row.join("  "));
                        }
                        other => {
                            let _ = writeln!(out, "{pad}  [{i}] {}", scalar(other));
                        }
                    }
                }
            }
            Val::Int(i) if k == "pid" => {
                let _ = writeln!(out, "{pad}{k:<width$}  {i}");
            }
            other => {
                let _ = writeln!(out, "{pad}{k:<width$}  {}", scalar(other));
            }
        }
    }
}

/// The report as an indented table.
pub fn to_table(report: &Obj) -> String {
    let mut out = String::new();
    table(&mut out, &report.0, 0);
    out
}

/// A progress line on stderr, refreshed by a background thread until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts printing `line()` every so often (nothing when `enabled` is false).
    pub fn start(enabled: bool, line: impl Fn() -> String + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled {
            return Progress { stop, handle: None };
        }
        let tty = std::io::stderr().is_terminal();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-progress".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let started = Instant::now();
                let every = if tty { Duration::from_millis(500) } else { Duration::from_secs(5) };
                let mut next = started + Duration::from_secs(2);
                let mut printed = false;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if Instant::now() < next {
                        continue;
                    }
                    next += every;
                    let text = format!("[{:>5.1}s] {}", started.elapsed().as_secs_f64(), line());
                    let mut err = std::io::stderr().lock();
                    if tty {
                        let _ = write!(err, "\r\x1b[2K{text}");
                    } else {
                        let _ = writeln!(err, "{text}");
                    }
                    let _ = err.flush();
                    printed = true;
                }
                if tty && printed {
                    let _ = write!(std::io::stderr(), "\r\x1b[2K");
                }
            })
            .ok();
        Progress { stop, handle }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
