//! End-to-end tests of the checkpoint contract against the built binary: runs that are
//! SIGTERM'd or SIGKILL'd at random moments and resumed must write a `model.txt`
//! byte-identical to an uninterrupted run.
//!
//! The random moments come from a seed printed on stderr; rerun with
//! `TRAINER_TEST_SEED=<seed>` to replay a failure.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_respawn-trainer");
const STEPS: u64 = 600;
const EVERY: u64 = 50;
/// Small enough that a debug build does the 600 steps in well under a second.
const FLAGS: [&str; 10] = [
    "--steps",
    "600",
    "--checkpoint-every",
    "50",
    "--batch-size",
    "16",
    "--hidden",
    "8",
    "--seed",
    "11",
];
/// With this delay a run takes over 1.2 s, so kills land mid-training.
const SLOW: [&str; 2] = ["--step-delay-ms", "2"];

/// A job's directories under one temporary root.
struct Job {
    _root: tempfile::TempDir,
    input: PathBuf,
    checkpoints: PathBuf,
    output: PathBuf,
}

impl Job {
    /// A job whose input dir holds a generated 300-row CSV.
    fn new() -> Job {
        let root = tempfile::tempdir().expect("tempdir");
        let input = root.path().join("input");
        fs::create_dir_all(&input).expect("mkdir input");
        let csv = Command::new(BIN)
            .args(["--generate-csv", "300", "--seed", "3"])
            .output()
            .expect("run --generate-csv");
        assert!(csv.status.success());
        fs::write(input.join("data.csv"), csv.stdout).expect("write csv");
        Job {
            checkpoints: root.path().join("checkpoints"),
            output: root.path().join("output"),
            input,
            _root: root,
        }
    }

    fn command(&self, attempt: u32, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(FLAGS)
            .args(extra)
            .env("RESPAWN_JOB_ID", "test-job")
            .env("RESPAWN_ATTEMPT", attempt.to_string())
            .env("RESPAWN_INPUT_DIR", &self.input)
            .env("RESPAWN_CHECKPOINT_DIR", &self.checkpoints)
            .env("RESPAWN_OUTPUT_DIR", &self.output)
            .env("RESPAWN_GRACE_SECONDS", "30");
        cmd
    }

    /// Runs to the end, expecting success; returns stdout.
    fn run_ok(&self, attempt: u32, extra: &[&str]) -> String {
        let out = self.command(attempt, extra).output().expect("run trainer");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "trainer failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn spawn(&self, attempt: u32, extra: &[&str]) -> Running {
        let mut child = self
            .command(attempt, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trainer");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stderr = child.stderr.take().expect("stderr piped");
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    fn model(&self) -> Vec<u8> {
        fs::read(self.output.join("model.txt")).expect("model.txt")
    }

    /// Complete checkpoint steps, ascending.
    fn complete_steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = fs::read_dir(&self.checkpoints)
            .expect("list checkpoints")
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let step: u64 = name.parse().ok()?;
                // `0200` is not a step directory.
                let canonical = step.to_string() == name;
                (canonical && e.path().join(".complete").is_file()).then_some(step)
            })
            .collect();
        steps.sort_unstable();
        steps
    }
}

/// A trainer running in the background, its stdout read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: thread::JoinHandle<String>,
    seen: Vec<String>,
}

impl Running {
    /// Waits for a stdout line matching `pred` and returns it.
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no expected line ({e}); stdout so far: {:?}", self.seen),
            }
        }
    }

    fn sigterm(&self) {
        let status = Command::new("sh")
            .args(["-c", "kill -TERM \"$0\"", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the exit; returns the status, all stdout lines and stderr.
    fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let status = self.child.wait().expect("wait");
        self.seen.extend(self.lines.iter());
        let stderr = self.stderr.join().expect("stderr reader");
        (status, self.seen, stderr)
    }
}

/// A small xorshift seeded from the clock, or from `TRAINER_TEST_SEED`.
struct Dice(u64);

impl Dice {
    fn new(test: &str) -> Dice {
        let seed = std::env::var("TRAINER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let now = SystemTime::now().duration_since(UNIX_EPOCH);
                now.map_or(1, |d| d.as_nanos() as u64) | 1
            });
        eprintln!("{test}: TRAINER_TEST_SEED={seed}");
        Dice(seed)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo))
    }
}

/// The step in a line `<prefix><step><suffix>`.
fn step_in(line: &str, prefix: &str, suffix: &str) -> Option<u64> {
    line.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn resumed_step(line: &str) -> Option<u64> {
    step_in(line, "resumed from step ", "")
}

/// The model of an uninterrupted run with `FLAGS`.
fn baseline() -> Vec<u8> {
    let job = Job::new();
    let stdout = job.run_ok(1, &[]);
    assert!(stdout.contains("starting from scratch"));
    assert!(
        stdout.contains(&format!("done: steps={STEPS} ")),
        "{stdout}"
    );
    job.model()
}

#[test]
fn sigterm_and_resume_three_times_gives_the_same_model() {
    let expected = baseline();
    let mut dice = Dice::new("sigterm");
    let job = Job::new();
    let mut last = 0;
    for attempt in 1..=3 {
        let mut run = job.spawn(attempt, &SLOW);
        let start = run.wait_for(|l| l == "starting from scratch" || l.starts_with("resumed"));
        assert_eq!(resumed_step(&start).unwrap_or(0), last, "{start}");
        thread::sleep(dice.millis(50, 300));
        run.sigterm();
        let (status, lines, stderr) = run.finish();
        assert_eq!(status.code(), Some(143), "{lines:?}\n{stderr}");
        let version = env!("CARGO_PKG_VERSION");
        let banner = format!("respawn-trainer {version}: job test-job attempt {attempt}");
        assert!(lines.contains(&banner), "{lines:?}");
        let step = lines
            .iter()
            .find_map(|l| step_in(l, "checkpointed step ", " on SIGTERM"))
            .unwrap_or_else(|| panic!("no SIGTERM line in {lines:?}"));
        assert!(step >= last && step < STEPS, "step {step} after {last}");
        assert_eq!(job.complete_steps().last(), Some(&step));
        assert!(!job.output.join("model.txt").exists());
        last = step;
    }
    let stdout = job.run_ok(4, &[]);
    assert!(
        stdout.contains(&format!("resumed from step {last}\n")),
        "{stdout}"
    );
    assert_eq!(job.model(), expected, "resumed model differs");
    assert_eq!(
        job.complete_steps(),
        [STEPS - EVERY, STEPS],
        "keeps the newest 2"
    );
}

#[test]
fn sigkill_loses_at_most_one_interval_and_resumes_to_the_same_model() {
    let expected = baseline();
    let mut dice = Dice::new("sigkill");
    let job = Job::new();
    let mut run = job.spawn(1, &SLOW);
    run.wait_for(|l| l.starts_with("step 100 loss"));
    thread::sleep(dice.millis(0, 200));
    run.child.kill().expect("SIGKILL");
    let (status, lines, _) = run.finish();
    assert_eq!(status.code(), None, "killed by a signal");
    let printed = lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("step ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    // A `step N` line is printed only after checkpoint N is complete, and the steps
    // done by the kill are fewer than the next line's N + EVERY.
    let stdout = job.run_ok(2, &[]);
    let resumed = stdout.lines().find_map(resumed_step).expect("resumed");
    assert!(
        resumed >= printed,
        "resumed from {resumed}, printed {printed}"
    );
    assert_eq!(resumed % EVERY, 0);
    assert_eq!(job.model(), expected, "resumed model differs");
}

#[test]
fn incomplete_and_corrupt_checkpoints_are_ignored() {
    let expected = baseline();
    let job = Job::new();
    job.run_ok(1, &["--steps", "100"]);
    assert_eq!(job.complete_steps(), [50, 100]);
    let ck = |name: &str| {
        let dir = job.checkpoints.join(name);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    };
    // A valid state without `.complete`: the marker, not the file, makes it count.
    let valid = fs::read_to_string(job.checkpoints.join("100/state.txt")).expect("state");
    fs::write(
        ck("150").join("state.txt"),
        valid.replace("step 100", "step 150"),
    )
    .expect("write");
    fs::write(ck("300").join("state.txt"), "garbage").expect("write");
    ck("250");
    // Complete but unreadable breaks the contract: skipped with a warning.
    fs::write(
        ck("120").join("state.txt"),
        "respawn-trainer checkpoint 1\nstep 1",
    )
    .expect("w");
    fs::write(ck("120").join(".complete"), "").expect("write");
    // Not step directories at all.
    fs::write(ck("0200").join(".complete"), "").expect("write");
    fs::write(job.checkpoints.join("latest"), "300").expect("write");

    let out = job.command(2, &[]).output().expect("run trainer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("resumed from step 100\n"), "{stdout}");
    assert!(stderr.contains("skipping unreadable"), "{stderr}");
    assert_eq!(job.model(), expected, "resumed model differs");
    assert_eq!(job.complete_steps(), [STEPS - EVERY, STEPS]);
    for debris in ["150", "250", "300", "120"] {
        assert!(
            !job.checkpoints.join(debris).exists(),
            "{debris} left behind"
        );
    }
    assert!(job.checkpoints.join("0200").exists() && job.checkpoints.join("latest").exists());
}

fn run_on_csv(csv: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.csv");
    fs::write(&path, csv).expect("write");
    let out = Command::new(BIN)
        .args(["--steps", "10", "--data"])
        .arg(&path)
        .env_remove("RESPAWN_CHECKPOINT_DIR")
        .env_remove("RESPAWN_OUTPUT_DIR")
        .output()
        .expect("run trainer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code(), stderr)
}

#[test]
fn malformed_csv_is_exit_2_with_the_line() {
    for (csv, line) in [
        ("a,b,label\n1,2,0\n1,x,1\n", 3),
        ("a,b,label\n1,2,0\n\n3,4,1\n5,6\n", 5),
        ("a,b,label\n1,2,0\n3,4,\n", 3),
    ] {
        let (code, stderr) = run_on_csv(csv);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("bad.csv: line {line}: ")),
            "{stderr}"
        );
    }
    let (code, stderr) = run_on_csv("");
    assert_eq!(code, Some(2));
    assert!(stderr.contains("bad.csv: the file is empty"), "{stderr}");
}

#[test]
fn missing_data_is_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .env("RESPAWN_INPUT_DIR", dir.path())
        .output()
        .expect("run trainer");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no *.csv file in"));
}

#[test]
fn generated_csv_is_deterministic() {
    let gen_csv = |seed: &str| {
        let out = Command::new(BIN)
            .args(["--generate-csv", "50", "--seed", seed])
            .output()
            .expect("run trainer");
        assert!(out.status.success());
        out.stdout
    };
    let a = gen_csv("5");
    assert_eq!(a, gen_csv("5"));
    assert_ne!(a, gen_csv("6"));
    assert_eq!(a.iter().filter(|&&b| b == b'\n').count(), 51);
}
