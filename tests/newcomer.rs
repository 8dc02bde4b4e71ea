//! What a new user runs into first: the demo's data folder, the CLI finding its
//! stack from anywhere in the project, and the bucket folders a rule watches.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use respawn_e2e::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_demo_refuses_to_empty_a_folder_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("my-work");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "years of work").unwrap();
    let out = Command::new(binary("respawn"))
        .args(["demo", "--data"])
        .arg(&mine)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to empty"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(mine.join("thesis.tex")).unwrap(),
        "years of work"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_finds_its_stack_from_any_folder_of_the_project() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    let up = Up::start(&project.join(".respawn"), &["--slots", "0"]).await;
    up.submit("name: found\ncommand: ['true']\n").await;
    let deep = project.join("src/models/v2");
    std::fs::create_dir_all(&deep).unwrap();
    let jobs = |from: &std::path::Path| {
        Command::new(binary("respawn"))
            .args(["jobs", "--output", "json", "--endpoint", &up.base])
            .current_dir(from)
            .env_remove("RESPAWN_TOKEN")
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    let out = jobs(&deep);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"found\""), "{stdout}");

    // Outside the project there is no token to find: the CLI says where it looked
    // and what to do.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = jobs(&elsewhere);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no API token found"), "{stderr}");
    assert!(
        stderr.contains("admin-token") && stderr.contains("--token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_folders_exist_at_start_and_new_folders_are_watched_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("triggers")).unwrap();
    std::fs::write(
        data.join("triggers/drops.yaml"),
        "name: drops\nmatch:\n  prefix: drops/\n  glob: \"**/*.csv\"\ntemplate:\n  name: t-${stem}\n  command: ['true']\n",
    )
    .unwrap();
    // As users start it: from their folder, with a relative data folder (the file
    // watcher reports absolute paths, which must still be read as bucket keys).
    let how = How {
        relative_to: Some(dir.path()),
        ..How::default()
    };
    let up = Up::start_how(&data, &["--slots", "0"], how).await;
    assert!(
        data.join("bucket/drops").is_dir(),
        "the folder the rule watches is there to copy into"
    );
    // A folder made after the start, and a file in it: the watcher covers the new
    // folder at once (the periodic rescan is 30 s away).
    let dropped = Instant::now();
    drop_file(
        &data.join("bucket/drops/2026/11/points.csv"),
        b"x1,label\n1,0\n",
    );
    loop {
        if !up.jobs().await.is_empty() {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "no job within 2 s of a file in a new folder:\n{}",
            up.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Found by the API fuzzer: two numbers one ulp apart are two sweep values, as
/// JSON Schema's uniqueItems says, in the binary as built for users (whose JSON
/// parser must not round them together; the test builds' dev-dependencies would
/// hide that, so this asks the real `respawn up`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_values_one_ulp_apart_are_two_values() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("data"), &["--slots", "0"]).await;
    let body = r#"{"name": "s", "template": {"name": "j", "command": ["true"]}, "grid": {"v": [1.7976931348623155e308, 1.7976931348623157e308]}}"#;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/arrays", up.base))
        .bearer_auth(up.token())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{status}: {text}");
}
