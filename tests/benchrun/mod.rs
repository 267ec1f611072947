//! Runs `chat-bench` for the tests and reads its JSON report.

#![allow(dead_code)]

use std::process::{Command, Output};

/// `chat-bench ARGS --json --quiet --timeout-secs 20`.
pub fn bench(args: &[&str]) -> Output {
    bench_waiting(args, 20)
}

/// `chat-bench ARGS --json --quiet --timeout-secs SECS`.
pub fn bench_waiting(args: &[&str], secs: u32) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chat-bench"))
        .args(args)
        .args(["--json", "--quiet", "--timeout-secs", &secs.to_string()])
        .output()
        .expect("chat-bench runs")
}

/// Every number that follows `"key": ` in the report (nested objects included); a
/// string under the same key (a status message under its code's name) is passed over.
pub fn values(json: &str, key: &str) -> Vec<i64> {
    let pat = format!("\"{key}\": ");
    json.match_indices(&pat)
        .map(|(at, _)| &json[at + pat.len()..])
        .filter(|rest| !rest.starts_with('"'))
        .map(|rest| {
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '-')).unwrap_or(rest.len());
            rest[..end].parse().unwrap_or_else(|_| panic!("{key} is not an integer in {json}"))
        })
        .collect()
}

/// The number that follows `"key": ` (once in the report), as a float.
pub fn float(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\": ");
    let at = json.find(&pat).unwrap_or_else(|| panic!("no {key:?} in {json}"));
    let rest = &json[at + pat.len()..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

pub fn one(json: &str, key: &str) -> i64 {
    let v = values(json, key);
    assert_eq!(v.len(), 1, "expected exactly one {key:?} in {json}");
    v[0]
}

pub fn run_ok(args: &[&str]) -> String {
    let out = bench(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chat-bench {args:?} failed with {}:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn assert_verified(json: &str) {
    for key in ["lost", "duplicates", "reordered", "cut_off", "protocol_errors"] {
        let v = values(json, key);
        assert!(!v.is_empty(), "no {key:?} in {json}");
        assert!(v.iter().all(|&n| n == 0), "{key} should be 0 in {json}");
    }
}
