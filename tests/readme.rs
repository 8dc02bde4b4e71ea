//! The README as a newcomer types it: every command of its `sh` blocks, in order, in
//! a fresh copy of the repository (its tracked and unignored files: no `.respawn/`,
//! and no `target/` but a link to the one these tests were built in, so that its
//! `cargo build` is quick), with the default data folder and ports.
//!
//! What a reader fills in, the test fills in the same way: `JOB` is the last job id a
//! command printed, `tok_…` the last token id, `ARRAY` the last array id. `respawn up`
//! runs in the background, as in a second terminal, until the next `respawn up` (the
//! reader pressed Ctrl-C) or the end. `export` lines carry over, as in one shell.
//! Besides every command exiting 0, the test checks what the README promises: the
//! demo's story, a job from the copied CSV within 2 s, and that job trained to
//! success through a `respawn preempt`. The one command it does not type is the
//! test command, `./scripts/test`: that is what runs it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The folder the workspace's binaries were built in (`target/debug`'s parent).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/readme-<hash>
    exe.ancestors().nth(3).unwrap().to_owned()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A fresh clone of the working tree: what `git clone` of it would give, with the
/// changes not yet committed.
fn fresh_copy(into: &Path) {
    let root = repo_root();
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "git ls-files failed");
    for name in out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let rel = Path::new(std::str::from_utf8(name).unwrap());
        let from = root.join(rel);
        if !from.is_file() {
            continue; // deleted in the working tree
        }
        let to = into.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    std::os::unix::fs::symlink(target_dir(), into.join("target")).unwrap();
}

/// The commands of the README's `sh` blocks, one per line, comments stripped.
fn readme_commands(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            in_sh = !in_sh && lang.trim() == "sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let command = match line.find("  #") {
            Some(i) => &line[..i],
            None => line,
        };
        let command = command.trim();
        if !command.is_empty() && !command.starts_with('#') {
            out.push(command.to_owned());
        }
    }
    out
}

/// The shell session: environment, what was printed so far, the background stack.
struct Session {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    printed: String,
    transcript: String,
    up: Option<(Child, PathBuf)>,
}

impl Session {
    fn fail(&self, why: &str) -> ! {
        let up_log = self
            .up
            .as_ref()
            .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
            .unwrap_or_default();
        panic!(
            "{why}\n--- transcript ---\n{}\n--- respawn up ---\n{up_log}",
            self.transcript
        );
    }

    fn bash(&self, line: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", line])
            .current_dir(&self.dir)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null());
        cmd
    }

    /// Fills in the placeholders a reader would.
    fn fill(&self, line: &str) -> String {
        let last = |re: &dyn Fn(&str) -> Option<String>| {
            self.printed
                .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .filter_map(re)
                .last()
        };
        let mut line = line.to_owned();
        if line.contains("JOB") {
            let job = last(&|w| is_job_id(w).then(|| w.to_owned()))
                .unwrap_or_else(|| self.fail(&format!("no job id printed before `{line}`")));
            line = line.replace("JOB", &job);
        }
        if line.contains("tok_…") {
            let tok = last(&|w| (w.starts_with("tok_") && w.len() > 10).then(|| w.to_owned()))
                .unwrap_or_else(|| self.fail(&format!("no token id printed before `{line}`")));
            line = line.replace("tok_…", &tok);
        }
        if line.contains("ARRAY") {
            let array = self
                .printed
                .lines()
                .map(str::trim)
                .rfind(|l| is_array_id(l))
                .unwrap_or_else(|| self.fail(&format!("no array id printed before `{line}`")))
                .to_owned();
            line = line.replace("ARRAY", &array);
        }
        line
    }

    fn run(&mut self, line: &str, timeout: Duration) -> String {
        let started = Instant::now();
        let mut child = self
            .bash(line)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                self.transcript
                    .push_str(&format!("$ {line}\n(timed out)\n"));
                self.fail(&format!("`{line}` ran past {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        self.transcript.push_str(&format!(
            "$ {line}    [{:.1}s, {status}]\n{out}{err}",
            started.elapsed().as_secs_f64()
        ));
        if !status.success() {
            self.fail(&format!("`{line}` failed: {status}"));
        }
        self.printed.push_str(&out);
        self.printed.push_str(&err);
        out
    }

    /// `export NAME=VALUE`, evaluated by the shell and kept for the next commands.
    fn export(&mut self, line: &str) {
        let name = line
            .trim_start_matches("export ")
            .split('=')
            .next()
            .unwrap()
            .trim()
            .to_owned();
        let out = self
            .bash(&format!("{line}; printf '%s' \"${name}\""))
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}");
        self.transcript.push_str(&format!("$ {line}\n"));
        self.env
            .insert(name, String::from_utf8(out.stdout).unwrap());
    }

    /// `respawn up …`, in the background until the API answers.
    fn start_up(&mut self, line: &str) {
        self.stop_up();
        let log = self.dir.join(format!("up-{}.log", self.transcript.len()));
        let child = self
            .bash(&format!("exec {line}"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap().try_clone().unwrap())
            .spawn()
            .unwrap();
        self.transcript.push_str(&format!("$ {line} &\n"));
        self.up = Some((child, log));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect("127.0.0.1:7878").is_ok() {
                return;
            }
            if let Some((child, _)) = &mut self.up
                && let Ok(Some(status)) = child.try_wait()
            {
                self.fail(&format!("`{line}` exited: {status}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.fail(&format!(
            "`{line}` did not serve 127.0.0.1:7878 within a minute"
        ));
    }

    /// Ctrl-C to the background stack; it must stop cleanly.
    fn stop_up(&mut self) {
        let Some((mut child, log)) = self.up.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                self.transcript
                    .push_str(&format!("(Ctrl-C: respawn up {status})\n"));
                if !status.success() {
                    self.up = None;
                    self.fail(&format!(
                        "respawn up did not stop cleanly: {status}\n{text}"
                    ));
                }
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                self.fail("respawn up did not stop within a minute of Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The job, as the CLI shows it to scripts.
    fn job(&mut self, id: &str) -> Value {
        let out = self
            .bash(&format!("./target/debug/respawn show {id} --output json"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn job_ids(&mut self) -> Vec<String> {
        let out = self
            .bash("./target/debug/respawn jobs --output json")
            .output()
            .unwrap();
        let page: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        page["jobs"]
            .as_array()
            .map(|j| {
                j.iter()
                    .filter_map(|j| j["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn is_job_id(w: &str) -> bool {
    w.len() == 26
        && w.starts_with("01")
        && w.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `lr-sweep-64cc507f540921d9`: a name, a dash, 16 hex digits.
fn is_array_id(w: &str) -> bool {
    w.rsplit_once('-').is_some_and(|(name, hash)| {
        !name.is_empty() && hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())
    }) && !w.contains(' ')
}

fn is_up(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| w[0].ends_with("respawn") && w[1] == "up")
}

#[test]
fn every_readme_command_works_from_a_fresh_clone() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let commands = readme_commands(&readme);
    assert!(commands.len() > 10, "the README's commands: {commands:?}");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("respawn");
    fresh_copy(&dir);
    let mut s = Session {
        dir,
        env: std::env::vars()
            .filter(|(k, _)| !k.starts_with("RESPAWN_"))
            .collect(),
        printed: String::new(),
        transcript: String::new(),
        up: None,
    };
    let mut csv_job = None;
    for command in &commands {
        // The test command is what runs this test.
        if command == "./scripts/test" {
            continue;
        }
        if command.starts_with("export ") {
            s.export(command);
            continue;
        }
        let line = s.fill(command);
        if is_up(&line) {
            s.start_up(&line);
            continue;
        }
        let timeout = if line.contains("cargo build") {
            Duration::from_secs(15 * 60)
        } else {
            Duration::from_secs(5 * 60)
        };
        let before = s.job_ids_if_up();
        let out = s.run(&line, timeout);

        if line.contains("respawn demo") {
            assert!(
                out.contains("succeeded after 3 attempts, 2 preemptions")
                    && out.contains("▶ attempt 1: preempted")
                    && out.contains("▶ attempt 2: preempted")
                    && out.contains("▶ attempt 3: succeeded")
                    && out.contains("▶ model: "),
                "the demo's story:\n{out}"
            );
            assert!(
                !out.contains(" INFO "),
                "the demo prints the broker's log:\n{out}"
            );
        }
        if line.starts_with("cp ") && line.contains("incoming/") {
            // The rule makes a job of the copied file within 2 s.
            let copied = Instant::now();
            let job = loop {
                let now: Vec<String> = s.job_ids();
                if let Some(new) = now.into_iter().find(|j| !before.contains(j)) {
                    break new;
                }
                if copied.elapsed() > Duration::from_secs(2) {
                    s.fail("no job from the copied CSV within 2 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            csv_job = Some(job);
        }
        if line.contains(" logs ") && line.contains(" -f") {
            let id = csv_job
                .clone()
                .unwrap_or_else(|| s.fail("logs -f before the CSV's job"));
            let job = s.job(&id);
            assert_eq!(
                job["state"], "succeeded",
                "the CSV's job: {job:#}\n{}",
                s.transcript
            );
            let preempted = job["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["outcome"]["kind"] == "preempted")
                .count();
            assert!(preempted >= 1, "trained through a preemption: {job:#}");
        }
    }
    s.stop_up();
    assert!(csv_job.is_some(), "the README copies a CSV into incoming/");
}

impl Session {
    /// The jobs now, when a stack is up.
    fn job_ids_if_up(&mut self) -> Vec<String> {
        if self.up.is_some() {
            self.job_ids()
        } else {
            Vec::new()
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.up.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
