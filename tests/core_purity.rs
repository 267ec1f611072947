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

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn core_has_no_io_clock_thread_or_transport() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"), &mut files);
    for path in &files {
        let text = fs::read_to_string(path).expect("readable source");
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
    }
    assert!(files.len() >= 10, "expected the core's files, found {}", files.len());
    assert!(files.iter().any(|f| f.ends_with("broker/streams.rs")), "subdirectories are read");
}
