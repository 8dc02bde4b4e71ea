//! The workload process: command or container, its environment, its signals.
//!
//! The workload is untrusted code. Its environment is built from nothing: a few
//! harmless variables, the job's `env` and secrets, and the `RESPAWN_*` contract —
//! never the agent's or the broker's. A command runs in the sandbox when the host
//! has one (see [`respawn_adapters::local::sandbox`]); without one it runs through a
//! launcher that makes the kernel kill it when the agent dies.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use respawn_adapters::local::sandbox::{self, Mounts, Sandbox};
use respawn_core::spec::JobSpec;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::Args;
use crate::run::Task;

/// The agent's first argument when it runs as the launcher of an unsandboxed workload.
pub const LAUNCH: &str = "__launch";

/// Variables of the agent's own environment a workload gets (besides HOME, which is
/// its work folder).
const PASS_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];
/// Variables a container runtime client needs to find its engine.
const RUNTIME_ENV: [&str; 7] = [
    "PATH",
    "HOME",
    "XDG_RUNTIME_DIR",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "CONTAINER_HOST",
];

/// The contract folders.
#[derive(Debug, Clone)]
pub struct WorkloadDirs {
    pub checkpoints: PathBuf,
    pub inputs: PathBuf,
    pub outputs: PathBuf,
    pub root: PathBuf,
}

impl WorkloadDirs {
    /// Makes the work folder under `vm_dir`. Its paths are absolute: the workload's
    /// working directory is elsewhere, and its contract paths must still resolve.
    pub fn create(vm_dir: &Path) -> std::io::Result<Self> {
        let root = std::path::absolute(crate::run::work_root(vm_dir))?;
        let dirs = WorkloadDirs {
            checkpoints: root.join("checkpoints"),
            inputs: root.join("input"),
            outputs: root.join("output"),
            root,
        };
        for d in [&dirs.checkpoints, &dirs.inputs, &dirs.outputs] {
            std::fs::create_dir_all(d)?;
        }
        Ok(dirs)
    }

    /// The spec's `working_dir`, relative ones inside the work folder.
    fn cwd(&self, spec: &JobSpec) -> PathBuf {
        match &spec.working_dir {
            Some(wd) => self.root.join(wd),
            None => self.root.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Workload {
    child: Child,
    pgid: Option<Pid>,
    /// A container's name, to stop it through the runtime.
    container: Option<(String, String)>,
    sandboxed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the job needs image {image}, but no container runtime (docker or podman) works on this machine; install one, or drop `image` to run the command as a process"
    )]
    NoRuntime { image: String },
    #[error("the job has no command")]
    NoCommand,
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

fn contract_env(
    spec: &JobSpec,
    args: &Args,
    task: &Task,
    dirs: &WorkloadDirs,
    inside: Option<&Path>,
) -> Vec<(String, String)> {
    let path = |p: &Path, name: &str| match inside {
        Some(root) => root.join(name).display().to_string(),
        None => p.display().to_string(),
    };
    // One process per GPU (one on a CPU node): torchrun's nproc_per_node, MPI's slots.
    let slots = spec.resources.gpus.max(1);
    let hosts = if args.hosts.is_empty() {
        vec!["localhost".to_owned()]
    } else {
        args.hosts.clone()
    };
    let hostfile = dirs.root.join("hostfile");
    let lines: String = hosts
        .iter()
        .map(|h| format!("{h} slots={slots}\n"))
        .collect();
    let _ = std::fs::write(&hostfile, lines);
    let master = if args.hosts.is_empty() {
        "127.0.0.1"
    } else {
        hosts[0].as_str()
    };
    let (nodes, rank, port) = (args.nodes(), args.rank, args.master_port);
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend([
        ("RESPAWN_JOB_ID".into(), task.job.to_string()),
        ("RESPAWN_ATTEMPT".into(), task.attempt.to_string()),
        ("RESPAWN_VM".into(), args.vm.clone()),
        (
            "RESPAWN_CHECKPOINT_DIR".into(),
            path(&dirs.checkpoints, "checkpoints"),
        ),
        ("RESPAWN_INPUT_DIR".into(), path(&dirs.inputs, "input")),
        ("RESPAWN_OUTPUT_DIR".into(), path(&dirs.outputs, "output")),
        ("RESPAWN_GRACE_SECONDS".into(), args.grace_secs.to_string()),
        ("RESPAWN_NUM_NODES".into(), nodes.to_string()),
        ("RESPAWN_NODE_RANK".into(), rank.to_string()),
        ("RESPAWN_NPROC_PER_NODE".into(), slots.to_string()),
        ("RESPAWN_MASTER_ADDR".into(), master.to_owned()),
        ("RESPAWN_MASTER_PORT".into(), port.to_string()),
        ("RESPAWN_HOSTFILE".into(), path(&hostfile, "hostfile")),
    ]);
    if nodes > 1 {
        // The names torchrun and MPI launchers read. Only on multi-node attempts: a
        // single-node script that sees WORLD_SIZE > 1 without torchrun's RANK would
        // wait for peers that never come.
        env.extend([
            ("MASTER_ADDR".into(), master.to_owned()),
            ("MASTER_PORT".into(), port.to_string()),
            ("NNODES".into(), nodes.to_string()),
            ("NODE_RANK".into(), rank.to_string()),
            ("NPROC_PER_NODE".into(), slots.to_string()),
            ("WORLD_SIZE".into(), (nodes * slots).to_string()),
        ]);
    }
    // A sweep's job learns its index here: the sweep cannot put it in `env`, where
    // RESPAWN_ names are reserved. Digits only, since anyone may set the label.
    if let Some(index) = spec.labels.get(respawn_core::sweep::INDEX_LABEL)
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
    {
        env.push(("RESPAWN_ARRAY_INDEX".into(), index.clone()));
    }
    // The workload's own spans, if it makes any, continue the attempt's trace.
    if let Some(parent) = respawn_telemetry::traceparent() {
        env.push(("TRACEPARENT".into(), parent));
    }
    env
}

/// The whole environment of a command workload: the allow-list, HOME, the job's
/// variables and secrets, the contract (set last, so nothing overrides it).
fn process_env(
    spec: &JobSpec,
    secrets: &BTreeMap<String, String>,
    args: &Args,
    task: &Task,
    dirs: &WorkloadDirs,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = PASS_ENV
        .iter()
        .filter_map(|k| Some((OsString::from(k), std::env::var_os(k)?)))
        .collect();
    env.push(("HOME".into(), dirs.root.clone().into()));
    env.extend(secrets.iter().map(|(k, v)| (k.into(), v.into())));
    env.extend(
        contract_env(spec, args, task, dirs, None)
            .into_iter()
            .map(|(k, v)| (k.into(), v.into())),
    );
    env
}

/// `program` as found on the agent's own PATH (unchanged when it names a path, or
/// is not found: spawning then says so).
fn on_agents_path(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_owned();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_owned())
}

/// Whether the container runtime's own CLI (root, on a cloud VM) would read the
/// variable `name` from its environment: the dynamic loader's, the runtime's
/// settings, where it looks for programs and configuration.
fn read_by_runtime(name: &str) -> bool {
    [
        "LD_",
        "DOCKER_",
        "CONTAINERS_",
        "CONTAINER_",
        "PODMAN_",
        "XDG_",
        "GCONV_",
        "MALLOC_",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || matches!(
            name,
            "PATH" | "HOME" | "TMPDIR" | "HOSTALIASES" | "LOCALDOMAIN" | "RES_OPTIONS"
        )
}

/// Gives the work folder, and everything the agent staged in it, to `uid` (its
/// group too), so that the workload running as it can write there.
fn hand_over(root: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(root, Some(uid), Some(uid))?;
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            hand_over(&path, uid)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
        }
    }
    Ok(())
}

impl Workload {
    pub fn spawn(
        spec: &JobSpec,
        secrets: &BTreeMap<String, String>,
        args: &Args,
        task: &Task,
        dirs: &WorkloadDirs,
        masked: Option<Vec<PathBuf>>,
    ) -> Result<Self, Error> {
        let sandbox = Sandbox::from_arg(&args.sandbox);
        let (mut cmd, container) = match &spec.image {
            Some(image) => {
                let rt = args
                    .container_runtime
                    .clone()
                    .ok_or_else(|| Error::NoRuntime {
                        image: image.clone(),
                    })?;
                let name = container_name(args, task);
                if let (true, Some(uid)) = (args.nodes() > 1, args.workload_uid) {
                    // The container runs as the workload's uid (see
                    // container_command), which must write its checkpoints.
                    hand_over(&dirs.root, uid).map_err(|source| Error::Spawn {
                        program: rt.clone(),
                        source,
                    })?;
                }
                (
                    container_command(&rt, image, spec, secrets, args, task, dirs),
                    Some((rt, name)),
                )
            }
            None => {
                let argv = spec.argv();
                let (program, rest) = argv.split_first().ok_or(Error::NoCommand)?;
                let cwd = dirs.cwd(spec);
                let mut cmd = match &sandbox {
                    Sandbox::Bwrap(bwrap) => {
                        let mounts = Mounts {
                            work: dirs.root.clone(),
                            read_only: args.read_only.clone(),
                            cwd,
                            masked,
                        };
                        // Found on the agent's PATH, not the job's: the command's
                        // environment is the job's own.
                        let mut cmd = Command::new(on_agents_path(bwrap));
                        if let Some(uid) = args.workload_uid {
                            hand_over(&dirs.root, uid).map_err(|source| Error::Spawn {
                                program: program.clone(),
                                source,
                            })?;
                            // Dropped in the child before bubblewrap starts (and its
                            // supplementary groups with it): no process of the agent's
                            // uid ever runs with the job's environment (LD_PRELOAD…).
                            cmd.uid(uid).gid(uid);
                        }
                        cmd.args(sandbox::bwrap_args(&mounts));
                        cmd
                    }
                    Sandbox::None => {
                        let launcher = std::env::current_exe().map_err(|source| Error::Spawn {
                            program: program.clone(),
                            source,
                        })?;
                        let mut cmd = Command::new(launcher);
                        cmd.arg(LAUNCH)
                            .arg(std::process::id().to_string())
                            .arg("--")
                            .current_dir(cwd);
                        cmd
                    }
                };
                cmd.arg(program)
                    .args(rest)
                    .env_clear()
                    .envs(process_env(spec, secrets, args, task, dirs));
                (cmd, None)
            }
        };
        // Its own process group, so that SIGTERM and the final kill reach every
        // process the workload starts (torchrun workers, shells, …).
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let program = spec.argv().first().cloned().unwrap_or_default();
        let child = cmd
            .spawn()
            .map_err(|source| Error::Spawn { program, source })?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        // The provider kills this group when the VM goes, even if the agent died first.
        if let Some(id) = child.id() {
            // With the attempt it belongs to: on a pool VM the provider must not
            // kill a later attempt's workload for this one's release.
            let _ = std::fs::write(
                args.vm_dir.join("workload.pgid"),
                format!("{id} {} {}", task.job, task.attempt),
            );
        }
        Ok(Workload {
            child,
            pgid,
            container,
            sandboxed: !sandbox.is_none() && spec.image.is_none(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Forwards the preemption notice.
    pub fn terminate(&mut self) {
        if let Some((rt, name)) = &self.container {
            let _ = std::process::Command::new(rt)
                .args(["kill", "--signal=TERM", "--", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            return;
        }
        if self.sandboxed {
            // Not the group: bubblewrap itself is in it, and a signalled bubblewrap
            // takes the sandbox down at once, leaving the workload no grace.
            let pids = sandbox::workload_pids(self.pid());
            if !pids.is_empty() {
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
                return;
            }
        }
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGTERM);
        }
    }

    /// Kills what is left of the workload's process group (children it left
    /// behind), and its container, which does not die with the runtime's client.
    pub fn kill_group(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if let Some((rt, name)) = self.container.take() {
            let _ = std::process::Command::new(rt)
                .args(["rm", "--force", "--", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Waits for exit; 128 + signal number when killed by a signal.
    pub async fn wait(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match self.child.wait().await {
            Ok(status) => status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(1),
            Err(_) => 1,
        }
    }
}

/// Secrets reach the container through the environment of `docker run` (`--env
/// NAME` without a value), never its command line, where `ps` would show them.
/// Every option is `--name=value` and `--` ends them, so that no value from the spec
/// can become an option of its own.
/// One name per attempt: a pool VM runs many, one after another.
fn container_name(args: &Args, task: &Task) -> String {
    format!("respawn-{}-{}-{}", args.vm, task.job, task.attempt)
}

fn container_command(
    rt: &str,
    image: &str,
    spec: &JobSpec,
    secrets: &BTreeMap<String, String>,
    args: &Args,
    task: &Task,
    dirs: &WorkloadDirs,
) -> Command {
    let inside = Path::new("/respawn");
    let mut cmd = Command::new(rt);
    cmd.env_clear();
    for k in RUNTIME_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    let name = container_name(args, task);
    cmd.args(["run", "--rm", &format!("--name={name}")]);
    let mut volume = |host: &Path, guest: &str| {
        let mut v = OsString::from("--volume=");
        v.push(host);
        v.push(":");
        v.push(inside.join(guest));
        cmd.arg(v);
    };
    volume(&dirs.checkpoints, "checkpoints");
    volume(&dirs.inputs, "input");
    volume(&dirs.outputs, "output");
    volume(&dirs.root.join("hostfile"), "hostfile");
    for (k, v) in contract_env(spec, args, task, dirs, Some(inside)) {
        cmd.arg(format!("--env={k}={v}"));
    }
    if let Ok(gpus) = std::env::var("CUDA_VISIBLE_DEVICES")
        && spec.resources.gpus > 0
    {
        cmd.arg(format!("--gpus=\"device={gpus}\""));
    }
    for (k, v) in secrets {
        if read_by_runtime(k) {
            // Never in the runtime CLI's own environment (LD_PRELOAD would run
            // the job's code as root): on its command line, seen only on this VM.
            cmd.arg(format!("--env={k}={v}"));
        } else {
            // Off the command line, which every process may read.
            cmd.arg(format!("--env={k}")).env(k, v);
        }
    }
    if let Some(wd) = &spec.working_dir {
        cmd.arg(format!("--workdir={wd}"));
    }
    if args.nodes() > 1 {
        // The other nodes reach this one's ranks at the VM's address (NCCL and
        // MPI open ports of their own choosing, beyond what a bridge would
        // publish), so the container shares the VM's network. The VM's firewall
        // keeps its metadata services to root; here the container never is root:
        // it runs as the workload's uid, with no capabilities and no way to gain
        // any (setuid binaries included).
        cmd.arg("--network=host");
        if let Some(uid) = args.workload_uid {
            cmd.args([
                format!("--user={uid}:{uid}"),
                "--cap-drop=ALL".to_owned(),
                "--security-opt=no-new-privileges".to_owned(),
            ]);
        }
    }
    cmd.arg("--").arg(image);
    cmd.args(spec.argv());
    cmd
}

/// `respawn-agent __launch <agent pid> -- PROGRAM ARGS…`: the parent of an
/// unsandboxed workload, doing what a VM's end (or a sandbox's pid namespace) would:
/// when the agent dies, or when the workload's main process exits, every process the
/// workload started dies too — even those that left its process group, since the
/// launcher adopts orphans (it is their subreaper). SIGTERM from the agent reaches
/// the workload through their shared process group; the launcher itself outlives it.
pub fn launch() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let fail = |msg: String| {
        eprintln!("respawn-agent: {msg}");
        ExitCode::from(127)
    };
    let usage = || fail("usage: respawn-agent __launch <agent pid> -- PROGRAM [ARGS…]".into());
    let (Some(parent), Some(dashes)) = (args.first(), args.get(1)) else {
        return usage();
    };
    if dashes != "--" || args.len() < 3 {
        return usage();
    }
    let parent = parent.to_str().and_then(|p| p.parse::<i32>().ok());
    match orphanage::run(parent, &args[2], &args[3..]) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(e),
    }
}

#[cfg(target_os = "linux")]
mod orphanage {
    use std::ffi::OsString;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::Pid;

    /// Runs the workload to its end; its exit code (128 + signal when killed).
    pub fn run(parent: Option<i32>, program: &OsString, args: &[OsString]) -> Result<u8, String> {
        let agent_gone = Arc::new(AtomicBool::new(false));
        // SIGHUP is the agent's death (below); SIGTERM is the preemption notice,
        // meant for the workload, which gets it through the process group.
        signal_hook::flag::register(signal_hook::consts::SIGHUP, agent_gone.clone())
            .map_err(|e| format!("cannot watch for the agent's death: {e}"))?;
        signal_hook::flag::register(
            signal_hook::consts::SIGTERM,
            Arc::new(AtomicBool::new(false)),
        )
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("cannot adopt the workload's orphans: {e}"))?;
        nix::sys::prctl::set_pdeathsig(Signal::SIGHUP)
            .map_err(|e| format!("cannot tie the workload to its agent: {e}"))?;
        // The agent may have died before the line above: then no SIGHUP would come.
        if parent != Some(nix::unistd::getppid().as_raw()) {
            return Ok(137);
        }
        let child = std::process::Command::new(program)
            .args(args)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))?;
        let main = Pid::from_raw(child.id() as i32);
        // Short jobs end within milliseconds: look soon, then less often.
        let mut nap = Duration::from_micros(200);
        loop {
            if agent_gone.load(Ordering::SeqCst) {
                kill_descendants();
                return Ok(137);
            }
            // Reap whatever ended, the main process or an adopted orphan.
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == main => {
                    kill_descendants();
                    return Ok(u8::try_from(code).unwrap_or(1));
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                    kill_descendants();
                    return Ok(128u8.saturating_add(sig as u8));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(50));
                }
                Ok(_) => {}
            }
        }
    }

    /// SIGKILL to every process below this one, until none is left.
    fn kill_descendants() {
        let me = std::process::id();
        for _ in 0..20 {
            let mut found = Vec::new();
            let mut stack = vec![me];
            while let Some(pid) = stack.pop() {
                for child in children(pid) {
                    found.push(child);
                    stack.push(child);
                }
            }
            if found.is_empty() {
                return;
            }
            for pid in found {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            // Reap them, so that they leave /proc and the next round sees new ones only.
            while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                if status == WaitStatus::StillAlive {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn children(pid: u32) -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }
}

/// Elsewhere (no parent-death signal, no subreapers) the launcher only becomes
/// the workload.
#[cfg(not(target_os = "linux"))]
mod orphanage {
    use std::ffi::OsString;

    pub fn run(_parent: Option<i32>, program: &OsString, args: &[OsString]) -> Result<u8, String> {
        let argv: Result<Vec<CString>, _> = std::iter::once(program)
            .chain(args)
            .map(|a| CString::new(a.as_encoded_bytes()))
            .collect();
        let argv = argv.map_err(|_| "an argument holds a NUL byte".to_owned())?;
        match nix::unistd::execvp(&argv[0], &argv) {
            Err(e) => Err(format!("cannot start {}: {e}", program.to_string_lossy())),
            Ok(never) => match never {},
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;
    use respawn_core::spec::{Format, parse};
    use respawn_core::time::Timestamp;

    use super::*;

    #[test]
    fn no_spec_value_becomes_a_container_runtime_option() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkloadDirs::create(dir.path()).unwrap();
        let spec = parse(
            "name: c\nimage: ubuntu:24.04\ncommand: ['--privileged', '-v', '/:/host']\n\
             working_dir: '-v'\nenv: { A: '--rm' }\nsecrets: { TOKEN: s3cret }\n",
            Format::Yaml,
        )
        .unwrap();
        let args = Args {
            bucket: dir.path().join("bucket").display().to_string(),
            vm_dir: dir.path().to_owned(),
            vm: "vm-1".into(),
            job: None,
            attempt: None,
            pool: true,
            pool_api: false,
            heartbeat_secs: 1,
            container_runtime: Some("docker".into()),
            grace_secs: 5,
            sandbox: "none".into(),
            read_only: Vec::new(),
            workload_uid: None,
            imds: None,
            scheduled_events: None,
            rank: 0,
            nodes: 1,
            hosts: Vec::new(),
            master_port: 29500,
        };
        let secrets = BTreeMap::from([
            ("TOKEN".to_owned(), "s3cret".to_owned()),
            ("LD_PRELOAD".to_owned(), "/work/evil.so".to_owned()),
        ]);
        let cmd = container_command(
            "docker",
            "ubuntu:24.04",
            &spec,
            &secrets,
            &args,
            &Task {
                job: respawn_core::JobId::generate(Timestamp(1)),
                attempt: 1,
            },
            &dirs,
        );
        let argv: Vec<String> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let end = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(argv[0], "run");
        for opt in &argv[1..end] {
            // Every option carries its value: none can take the next word as one.
            assert!(
                opt.starts_with("--") && (opt.contains('=') || opt == "--rm"),
                "{opt}"
            );
        }
        assert_eq!(argv[end + 1], "ubuntu:24.04", "{argv:?}");
        assert_eq!(&argv[end + 2..], ["--privileged", "-v", "/:/host"]);
        assert!(argv.contains(&"--workdir=-v".to_owned()));
        assert!(
            !argv.iter().any(|a| a.contains("s3cret")),
            "a secret on the command line"
        );
        assert!(argv.contains(&"--env=TOKEN".to_owned()));
        // What the runtime's own CLI (root) would read never reaches its
        // environment.
        let env: Vec<String> = cmd
            .as_std()
            .get_envs()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(!env.contains(&"LD_PRELOAD".to_owned()), "{env:?}");
        assert!(env.contains(&"TOKEN".to_owned()));
        assert!(argv.contains(&"--env=LD_PRELOAD=/work/evil.so".to_owned()));
        // One node: the runtime's bridge, as every container.
        assert!(!argv.iter().any(|a| a.starts_with("--network")), "{argv:?}");
    }

    #[test]
    fn a_gang_nodes_container_shares_the_vms_network_and_is_never_root() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkloadDirs::create(dir.path()).unwrap();
        let spec = parse(
            "name: c
image: pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
command: [torchrun, train.py]
resources: { nodes: 2 }
",
            Format::Yaml,
        )
        .unwrap();
        let args = agent_args(
            &dir.path().display().to_string(),
            &[
                "--container-runtime=docker",
                "--workload-uid=1001",
                "--rank=1",
                "--hosts=10.0.0.4,10.0.0.5",
                "--job=01J00000000000000000000000",
                "--attempt=1",
            ],
        )
        .unwrap();
        let task = Task {
            job: respawn_core::JobId::generate(Timestamp(1)),
            attempt: 1,
        };
        let argv = |cmd: Command| -> Vec<String> {
            cmd.as_std()
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let got = argv(container_command(
            "docker",
            spec.image.as_deref().unwrap(),
            &spec,
            &BTreeMap::new(),
            &args,
            &task,
            &dirs,
        ));
        let end = got.iter().position(|a| a == "--").unwrap();
        for want in [
            "--network=host",
            "--user=1001:1001",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--env=MASTER_ADDR=10.0.0.4",
            "--env=NODE_RANK=1",
        ] {
            assert!(got[..end].contains(&want.to_owned()), "{want}: {got:?}");
        }
    }

    /// The agent's arguments: its VM's (in `vm_dir`), then `extra`.
    fn agent_args(vm_dir: &str, extra: &[&str]) -> clap::error::Result<Args> {
        let mut argv = vec!["respawn-agent", "--bucket", "b", "--vm-dir", vm_dir];
        argv.extend(["--vm", "vm-1"]);
        argv.extend(extra);
        Args::try_parse_from(argv)
    }

    fn env_of(args: &[&str], yaml: &str) -> (BTreeMap<String, String>, String) {
        let dir = tempfile::tempdir().unwrap();
        let dirs = WorkloadDirs::create(dir.path()).unwrap();
        let args = agent_args(&dir.path().display().to_string(), args).unwrap();
        let spec = parse(yaml, Format::Yaml).unwrap();
        let task = Task {
            job: respawn_core::JobId::generate(Timestamp(1)),
            attempt: 1,
        };
        let env = contract_env(&spec, &args, &task, &dirs, None)
            .into_iter()
            .collect();
        let hostfile = std::fs::read_to_string(dirs.root.join("hostfile")).unwrap();
        (env, hostfile)
    }

    #[test]
    fn a_multi_node_attempt_gets_the_torchrun_and_mpi_names() {
        let yaml =
            "name: d\ncommand: [x]\nresources: { gpus: 2, nodes: 3 }\nenv: { MASTER_PORT: '1' }\n";
        let (env, hostfile) = env_of(
            &[
                "--job",
                "01j0000000000000000000000a",
                "--attempt",
                "1",
                "--rank",
                "2",
                "--hosts",
                "10.0.0.5,10.0.0.6,10.0.0.7",
                "--master-port",
                "40001",
            ],
            yaml,
        );
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("RESPAWN_NUM_NODES"), Some("3"));
        assert_eq!(get("RESPAWN_NODE_RANK"), Some("2"));
        assert_eq!(get("NNODES"), Some("3"));
        assert_eq!(get("NODE_RANK"), Some("2"));
        assert_eq!(get("NPROC_PER_NODE"), Some("2"));
        assert_eq!(
            get("WORLD_SIZE"),
            Some("6"),
            "processes: nodes × GPUs per node"
        );
        assert_eq!(get("MASTER_ADDR"), Some("10.0.0.5"), "rank 0's address");
        assert_eq!(
            get("MASTER_PORT"),
            Some("40001"),
            "the contract wins over env"
        );
        assert_eq!(
            hostfile,
            "10.0.0.5 slots=2\n10.0.0.6 slots=2\n10.0.0.7 slots=2\n"
        );
    }

    #[test]
    fn a_single_node_attempt_gets_no_world_size() {
        let (env, hostfile) = env_of(
            &["--job", "01j0000000000000000000000a", "--attempt", "1"],
            "name: s\ncommand: [x]\nresources: { gpus: 4 }\n",
        );
        assert_eq!(env.get("RESPAWN_NUM_NODES").map(String::as_str), Some("1"));
        for k in ["WORLD_SIZE", "NODE_RANK", "NNODES", "MASTER_ADDR"] {
            assert!(
                !env.contains_key(k),
                "{k}: a script run without torchrun would wait for peers"
            );
        }
        assert_eq!(hostfile, "localhost slots=4\n");
    }

    #[test]
    fn a_rank_outside_the_gang_is_refused() {
        let parse = |extra: &[&str]| {
            let task = ["--job", "01j0000000000000000000000a", "--attempt", "1"];
            agent_args("d", &[&task[..], extra].concat()).unwrap()
        };
        assert!(
            parse(&["--rank", "1"]).check().is_err(),
            "one node: rank 0 only"
        );
        assert!(parse(&["--rank", "2", "--hosts", "a,b"]).check().is_err());
        assert!(parse(&["--rank", "3", "--nodes", "3"]).check().is_err());
        assert!(parse(&["--rank", "2", "--nodes", "3"]).check().is_ok());
        assert!(parse(&["--rank", "1", "--hosts", "a,b"]).check().is_ok());
        assert!(
            agent_args("d", &["--pool", "--hosts", "a,b"]).is_err(),
            "pool VMs run single-node attempts"
        );
    }

    #[test]
    fn the_sandbox_is_found_on_the_agents_path() {
        let found = on_agents_path(Path::new("sh"));
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        assert_eq!(
            on_agents_path(Path::new("/opt/bwrap")),
            Path::new("/opt/bwrap")
        );
    }
}
