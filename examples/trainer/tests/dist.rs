//! Multi-node runs of the built binary: three ranks on loopback, data-parallel with
//! an all-reduce every step. A run whose rank 1 gets SIGTERM mid-way stops on every
//! rank at the same step; resumed from rank 0's checkpoint on every rank, it writes
//! a `model.txt` byte-identical to an uninterrupted three-rank run.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_respawn-trainer");
const RANKS: usize = 3;
const FLAGS: [&str; 12] = [
    "--steps",
    "400",
    "--checkpoint-every",
    "25",
    "--batch-size",
    "15",
    "--hidden",
    "8",
    "--seed",
    "11",
    "--step-delay-ms",
    "3",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Each rank's folders, as each node of a job has its own.
struct Gang {
    root: tempfile::TempDir,
}

impl Gang {
    fn new() -> Gang {
        let root = tempfile::tempdir().expect("tempdir");
        let csv = Command::new(BIN)
            .args(["--generate-csv", "300", "--seed", "3"])
            .output()
            .expect("run --generate-csv");
        assert!(csv.status.success());
        for rank in 0..RANKS {
            let input = root.path().join(format!("{rank}/input"));
            fs::create_dir_all(&input).expect("mkdir");
            fs::write(input.join("data.csv"), &csv.stdout).expect("write csv");
        }
        Gang { root }
    }

    fn dir(&self, rank: usize, what: &str) -> PathBuf {
        self.root.path().join(format!("{rank}/{what}"))
    }

    fn start(&self, port: u16) -> Vec<Child> {
        (0..RANKS)
            .map(|rank| {
                Command::new(BIN)
                    .args(FLAGS)
                    .env("RESPAWN_NUM_NODES", RANKS.to_string())
                    .env("RESPAWN_NODE_RANK", rank.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .env("RESPAWN_INPUT_DIR", self.dir(rank, "input"))
                    .env("RESPAWN_CHECKPOINT_DIR", self.dir(rank, "checkpoints"))
                    .env("RESPAWN_OUTPUT_DIR", self.dir(rank, "output"))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start a rank")
            })
            .collect()
    }

    /// What the agent does before a resumed attempt: every rank's checkpoint
    /// folder gets the checkpoints rank 0 uploaded.
    fn restore_everywhere(&self) {
        let from = self.dir(0, "checkpoints");
        for rank in 1..RANKS {
            let to = self.dir(rank, "checkpoints");
            let _ = fs::remove_dir_all(&to);
            copy(&from, &to);
        }
    }
}

fn copy(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).expect("copy");
        }
    }
}

fn finish(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_three_rank_run_stopped_on_one_rank_resumes_to_the_same_model() {
    let whole = Gang::new();
    let outs = finish(whole.start(free_port()));
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(o));
    }
    let expected = fs::read(whole.dir(0, "output/model.txt")).expect("rank 0 wrote the model");
    for rank in 1..RANKS {
        assert!(
            !whole.dir(rank, "output/model.txt").exists()
                && !whole.dir(rank, "checkpoints").exists(),
            "only rank 0 writes checkpoints and outputs"
        );
    }

    let gang = Gang::new();
    let mut children = gang.start(free_port());
    // SIGTERM to rank 1 once rank 0 has checkpointed at least once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_dir(gang.dir(0, "checkpoints"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "no checkpoint from rank 0");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = children[1].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let outs = finish(std::mem::take(&mut children));
    let mut stopped_at = Vec::new();
    for (rank, o) in outs.iter().enumerate() {
        assert_eq!(o.status.code(), Some(143), "rank {rank}: {}", text(o));
        let out = text(o);
        let step = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("checkpointed step ")
                    .or_else(|| l.strip_prefix("stopped at step "))
            })
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("rank {rank} said where it stopped: {out}"))
            .to_owned();
        stopped_at.push(step);
    }
    assert!(
        stopped_at.iter().all(|s| *s == stopped_at[0]),
        "every rank stopped at the same step: {stopped_at:?}"
    );
    assert!(
        !gang.dir(0, "output/model.txt").exists(),
        "stopped before the end"
    );

    gang.restore_everywhere();
    let outs = finish(gang.start(free_port()));
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(o));
        assert!(
            text(o).contains(&format!("resumed from step {}", stopped_at[0])),
            "rank {rank} resumed from the same step: {}",
            text(o)
        );
    }
    let resumed = fs::read(gang.dir(0, "output/model.txt")).expect("the resumed model");
    assert!(
        resumed == expected,
        "the resumed model differs from an uninterrupted three-rank run's"
    );
}

#[test]
fn ranks_that_restored_different_checkpoints_refuse_to_train() {
    let gang = Gang::new();
    // Rank 0 finishes a short run alone; the others have nothing.
    let solo = Command::new(BIN)
        .args(["--steps", "50", "--checkpoint-every", "25", "--hidden", "8"])
        .env("RESPAWN_INPUT_DIR", gang.dir(0, "input"))
        .env("RESPAWN_CHECKPOINT_DIR", gang.dir(0, "checkpoints"))
        .output()
        .expect("run");
    assert!(solo.status.success(), "{}", text(&solo));
    let port = free_port();
    let children: Vec<Child> = (0..RANKS)
        .map(|rank| {
            Command::new(BIN)
                .args([
                    "--steps",
                    "100",
                    "--checkpoint-every",
                    "25",
                    "--hidden",
                    "8",
                ])
                .env("RESPAWN_NUM_NODES", RANKS.to_string())
                .env("RESPAWN_NODE_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RESPAWN_INPUT_DIR", gang.dir(rank, "input"))
                .env("RESPAWN_CHECKPOINT_DIR", gang.dir(rank, "checkpoints"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start")
        })
        .collect();
    let outs = finish(children);
    assert_eq!(outs[0].status.code(), Some(2), "{}", text(&outs[0]));
    assert!(
        text(&outs[0]).contains("every rank must restore the same checkpoint"),
        "{}",
        text(&outs[0])
    );
    assert!(
        outs[1..].iter().any(|o| o.status.code() == Some(2)),
        "a refused rank says so"
    );
}
