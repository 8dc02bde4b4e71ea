//! `respawn validate` on broken specs names the field and the problem for each.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn respawn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_respawn"))
}

#[test]
fn broken_specs_print_path_and_problem() {
    let dir = repo().join("tests/fixtures/bad-specs");
    let expected = std::fs::read_to_string(dir.join("expected.txt")).expect("expected.txt");
    let mut checked = 0;
    for line in expected.lines().filter(|l| !l.trim().is_empty()) {
        let (file, want) = line.split_once('\t').expect("file<TAB>message");
        let out = respawn()
            .arg("validate")
            .arg(dir.join(file))
            .output()
            .expect("run respawn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file}: validate must fail");
        assert!(
            stderr.contains(want),
            "{file}: expected {want:?} in:\n{stderr}"
        );
        assert!(
            stderr.contains(file),
            "{file}: the message names the file:\n{stderr}"
        );
        checked += 1;
    }
    assert!(checked >= 15, "all fixtures checked");
}

#[test]
fn example_specs_are_valid() {
    let dir = repo().join("examples/specs");
    for entry in std::fs::read_dir(&dir).expect("examples/specs") {
        let path = entry.expect("entry").path();
        let out = respawn()
            .arg("validate")
            .arg(&path)
            .output()
            .expect("run respawn");
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn printed_specs_never_show_secrets() {
    let path = repo().join("examples/specs/train-mlp.yaml");
    let out = respawn()
        .args(["validate", "--print"])
        .arg(&path)
        .output()
        .expect("run respawn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("WANDB_API_KEY"), "the name is shown");
    assert!(
        !stdout.contains("not-a-real-key"),
        "the value is not: {stdout}"
    );
    assert!(stdout.contains("\"redacted\": true"));
}

#[test]
fn several_files_report_each() {
    let dir = repo().join("tests/fixtures/bad-specs");
    let out = respawn()
        .arg("validate")
        .arg(dir.join("gpus-word.yaml"))
        .arg(dir.join("priority.yaml"))
        .arg(repo().join("examples/specs/train-gpu.json"))
        .output()
        .expect("run respawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("resources.gpus"));
    assert!(stderr.contains("priority"));
    assert!(stderr.contains("2 of 3 specs invalid"), "{stderr}");
}
