//! Replays every committed fuzz seed (`fuzz/corpus/<target>/`) and every input a fuzzer once
//! crashed on (`fuzz/regressions/<target>/`) through the same harness the fuzz targets run,
//! under README's test command (`scripts/test`): a fixed crash stays fixed without running a fuzzer.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        files.extend(
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.is_file()),
        );
    }
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        files.len() >= 5,
        "too few committed inputs for {target}: {files:?}"
    );
    for file in &files {
        let data = std::fs::read(file).expect("read input");
        // A panic names the input: the assertion message comes from the harness.
        eprintln!("replaying {}", file.display());
        run(&data);
    }
}

#[test]
fn token_inputs_replay_cleanly() {
    replay("token", harness::token);
}

#[test]
fn http_request_inputs_replay_cleanly() {
    replay("http_request", harness::http_request);
}

#[test]
fn graphql_request_inputs_replay_cleanly() {
    replay("graphql_request", harness::graphql_request);
}

#[test]
fn pg_frames_inputs_replay_cleanly() {
    replay("pg_frames", harness::pg_frames);
}

#[test]
fn sql_classify_inputs_replay_cleanly() {
    replay("sql_classify", harness::sql);
}
