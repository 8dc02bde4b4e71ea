//! Helpers for end-to-end tests: run the real `respawn up` as a child process, talk
//! to its API, and look at what it left on disk and in the process table.
#![allow(clippy::unwrap_used)]

#[cfg(feature = "azure")]
pub mod arm;
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "azure")]
pub mod functions_host;
#[cfg(feature = "aws")]
pub mod lambda;
pub mod otlp;
#[cfg(feature = "aws")]
pub mod vm;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// CPU time (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat`: for benchmarks whose throughput a shared machine blurs.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, which may hold spaces, in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // utime and stime, fields 14 and 15 of the whole line, in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// A workspace binary, built next to the test binary's folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run the workspace's tests (cargo test --workspace) or cargo build first",
        path.display()
    );
    path
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to start `respawn up`, besides its arguments.
#[derive(Debug, Default, Clone, Copy)]
pub struct How<'a> {
    /// Variables added to the broker's environment.
    pub env: &'a [(&'a str, &'a str)],
    /// A command to run it under (e.g. `strace -f -o FILE`).
    pub wrapper: &'a [&'a str],
    /// Run it in this folder, with `--data` relative to it (as users type it).
    pub relative_to: Option<&'a Path>,
}

/// A running `respawn up`.
#[derive(Debug)]
pub struct Up {
    pub child: Child,
    pub data: PathBuf,
    pub base: String,
    pub log: PathBuf,
    http: reqwest::Client,
    token: String,
}

impl Up {
    /// Starts `respawn up` on `data` and waits until its API answers.
    pub async fn start(data: &Path, extra: &[&str]) -> Up {
        Up::start_with_env(data, extra, &[]).await
    }

    /// [`Up::start`], with variables added to the broker's environment.
    pub async fn start_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Up {
        let how = How {
            env,
            ..How::default()
        };
        Up::start_how(data, extra, how).await
    }

    /// [`Up::start`], the way `how` says.
    pub async fn start_how(data: &Path, extra: &[&str], how: How<'_>) -> Up {
        let How {
            env,
            wrapper,
            relative_to,
        } = how;
        let port = free_port();
        let log = data.join(format!("up-{port}.log"));
        std::fs::create_dir_all(data).unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let respawn = binary("respawn");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&respawn);
                c
            }
            None => Command::new(&respawn),
        };
        if let Some(cwd) = relative_to {
            cmd.current_dir(cwd);
        }
        let data_arg = relative_to
            .and_then(|cwd| data.strip_prefix(cwd).ok())
            .unwrap_or(data);
        let child = cmd
            .arg("up")
            .arg("--data")
            .arg(data_arg)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--heartbeat-secs",
                "1",
            ])
            .args(extra)
            .env(
                "RESPAWN_LOG",
                std::env::var("RESPAWN_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut up = Up {
            child,
            data: data.to_owned(),
            base: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::Client::new(),
            token: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if up
                .http
                .get(format!("{}/healthz", up.base))
                .send()
                .await
                .is_ok()
            {
                // The admin token `respawn up` leaves in a new data folder.
                let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
                up.token = token.trim().to_owned();
                return up;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("respawn up did not start:\n{}", up.log_text());
    }

    /// The admin token of the stack's data folder.
    pub fn token(&self) -> String {
        self.token.clone()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// SIGKILL: the broker dies at whatever line it was on.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Ctrl-C, and wait for a clean exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let _ = kill(self.pid(), Signal::SIGINT);
        self.child.wait().unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        resp.json().await.unwrap()
    }

    pub async fn submit(&self, spec: &str) -> Value {
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .bearer_auth(&self.token)
            .body(spec.to_owned())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "submit failed: {}",
            resp.text().await.unwrap()
        );
        resp.json().await.unwrap()
    }

    /// Sends a preemption notice to the job's VM; `false` if it had none running.
    pub async fn preempt(&self, job: &str, notice: Duration) -> bool {
        let resp = self
            .http
            .post(format!("{}/v1/preempt", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "target": job, "notice_secs": notice.as_secs_f64() }))
            .send()
            .await
            .unwrap();
        resp.status().is_success()
    }

    pub async fn jobs(&self) -> Vec<Value> {
        self.get("/v1/jobs?limit=1000").await["jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The ids of every job in `state` (all jobs for `None`), through the API's pages.
    pub async fn job_ids(&self, state: Option<&str>) -> Vec<String> {
        let mut ids = Vec::new();
        let mut after = String::new();
        loop {
            let mut path = "/v1/jobs?limit=1000".to_owned();
            if let Some(state) = state {
                path.push_str(&format!("&state={state}"));
            }
            if !after.is_empty() {
                path.push_str(&format!("&after={after}"));
            }
            let page = self.get(&path).await;
            let jobs = page["jobs"].as_array().into_iter().flatten();
            ids.extend(jobs.filter_map(|j| j["id"].as_str().map(str::to_owned)));
            match page["next"].as_str() {
                Some(next) => after = next.to_owned(),
                None => return ids,
            }
        }
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    /// Waits until `f` holds for the job; panics with the broker's log after `timeout`.
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if f(&job) {
                return job;
            }
            if Instant::now() > deadline {
                panic!(
                    "job {id}: {what} not reached in {timeout:?}; job: {job:#}\nlog:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The whole stdout of one attempt, as shipped to the bucket.
    pub fn attempt_stdout(&self, job: &str, attempt: u64) -> String {
        self.attempt_log(job, attempt, "stdout")
    }

    /// The whole stdout or stderr of one attempt, as shipped to the bucket.
    pub fn attempt_log(&self, job: &str, attempt: u64, stream: &str) -> String {
        self.chunks(&format!("{attempt}/{stream}"), job)
    }

    /// The whole stdout of node `rank` of a multi-node attempt (rank 0's is the
    /// attempt's own).
    pub fn node_stdout(&self, job: &str, attempt: u64, rank: u32) -> String {
        match rank {
            0 => self.attempt_stdout(job, attempt),
            _ => self.chunks(&format!("{attempt}/nodes/{rank}/stdout"), job),
        }
    }

    /// The log chunks under `jobs/<job>/attempts/<under>`, joined in order.
    fn chunks(&self, under: &str, job: &str) -> String {
        let dir = self
            .data
            .join(format!("bucket/jobs/{job}/attempts/{under}"));
        let mut chunks: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        chunks.sort();
        chunks
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_leftovers(&self.data);
    }
}

/// Processes (agents, workloads) whose command line or environment mentions `data`.
pub fn leftovers(data: &Path) -> Vec<(i32, String)> {
    let needle = data.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?)
                .replace('\0', " ");
            let cwd = std::fs::read_link(e.path().join("cwd"))
                .ok()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let ours = cmdline.contains(&needle) || cwd.starts_with(&needle);
            (ours && !cmdline.is_empty()).then_some((pid, cmdline))
        })
        .collect()
}

pub fn kill_leftovers(data: &Path) {
    for (pid, _) in leftovers(data) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Waits until no process of `data` is left; returns those still there after `timeout`.
pub async fn wait_no_leftovers(data: &Path, timeout: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = leftovers(data);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the trainer directly, uninterrupted, and returns its model bytes.
pub fn baseline_model(csv: &Path, args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let output = dir.path().join("output");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(&output).unwrap();
    std::fs::copy(csv, input.join("data.csv")).unwrap();
    let status = Command::new(binary("respawn-trainer"))
        .args(args)
        .env("RESPAWN_INPUT_DIR", &input)
        .env("RESPAWN_OUTPUT_DIR", &output)
        .env("RESPAWN_CHECKPOINT_DIR", dir.path().join("ckpt"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(output.join("model.txt")).unwrap()
}

/// A CSV from the trainer's generator.
pub fn generate_csv(rows: usize, path: &Path) {
    let out = Command::new(binary("respawn-trainer"))
        .args(["--generate-csv", &rows.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(path, out.stdout).unwrap();
}

/// Writes `bytes` to `path` atomically (aside, then renamed), as an upload tool would.
pub fn drop_file(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The biggest `step N` the trainer printed.
pub fn last_step(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

/// The step of `checkpointed step N on SIGTERM`, if the trainer printed it.
pub fn sigterm_step(stdout: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        l.strip_prefix("checkpointed step ")?
            .strip_suffix(" on SIGTERM")?
            .parse()
            .ok()
    })
}

/// The uids (as the machine sees them, outside any sandbox) of job `job`'s
/// `respawn-trainer` processes running now.
pub fn workload_uids(job: &str) -> Vec<u32> {
    let mut uids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir = entry.path();
        let Ok(env) = std::fs::read(dir.join("environ")) else {
            continue;
        };
        let wanted = format!("RESPAWN_JOB_ID={job}");
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        if !env.split(|b| *b == 0).any(|v| v == wanted.as_bytes())
            || !cmdline.starts_with(b"respawn-trainer")
        {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
        {
            uids.push(uid);
        }
    }
    uids
}

/// The trainer's arguments in the cloud end-to-end tests: long enough (800 steps,
/// 20 ms each) to be preempted after a checkpoint (every 50 steps).
pub const CLOUD_TRAINER_ARGS: [&str; 10] = [
    "--steps",
    "800",
    "--checkpoint-every",
    "50",
    "--hidden",
    "8",
    "--seed",
    "11",
    "--step-delay-ms",
    "20",
];

/// Stand-ins, in `dir`, for what an emulated VM's boot script must not do to
/// this machine: `iptables` (logged to `$RESPAWN_VM_ROOT/iptables.log`) and
/// `shutdown`.
pub fn vm_shims(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, body) in [
        (
            "iptables",
            "#!/bin/sh\necho \"$@\" >> \"$RESPAWN_VM_ROOT/iptables.log\"\n",
        ),
        ("shutdown", "#!/bin/sh\nexit 0\n"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
}

/// That every uid seen is the one cloud VMs run workloads as (the firewall keeps
/// it from the instance metadata), and that some were seen.
#[cfg(any(feature = "aws", feature = "azure"))]
pub fn assert_workload_uid(uids: &[u32]) {
    assert!(!uids.is_empty(), "the workload was seen running");
    assert!(
        uids.iter()
            .all(|u| *u == respawn_adapters::cloudvm::WORKLOAD_UID),
        "the workload runs as its own uid, which the firewall keeps from the metadata: {uids:?}"
    );
}

/// When a long end-to-end test gives up: `default` from now, or `E2E_SECS`.
pub fn e2e_deadline(default: Duration) -> Instant {
    let secs = std::env::var("E2E_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(default, Duration::from_secs);
    Instant::now() + secs
}
