//! The sans-IO core stays free of clocks, threads, sockets, channels, randomness and
//! transport types. This reads the core's source, so it fails in CI the moment such a
//! call is added.

use std::fs;
use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "Instant::now",
    "SystemTime::now",
    "thread::spawn",
    "thread::sleep",
    "std::net",
    "std::fs",
    "grpcio",
    "crossbeam",
    "parking_lot",
    "getrandom",
    "crate::pb",
    "crate::server",
    "crate::client",
    "println!",
    "eprintln!",
];

#[test]
fn core_has_no_io_clock_thread_or_transport() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut checked = 0;
    for entry in fs::read_dir(&dir).expect("src/core exists") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                assert!(
                    !code.contains(word),
                    "{}:{}: the core must not use `{word}`: {line}",
                    path.display(),
                    n + 1
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 5, "expected the core's files, found {checked}");
}
