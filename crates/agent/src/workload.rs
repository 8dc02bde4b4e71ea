//! The workload process: command or container, its environment, its signals.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use respawn_core::spec::JobSpec;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::Args;

/// The contract folders.
#[derive(Debug, Clone)]
pub struct WorkloadDirs {
    pub checkpoints: PathBuf,
    pub inputs: PathBuf,
    pub outputs: PathBuf,
    pub root: PathBuf,
}

impl WorkloadDirs {
    pub fn create(vm_dir: &Path) -> std::io::Result<Self> {
        let root = crate::run::work_root(vm_dir);
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
}

#[derive(Debug)]
pub struct Workload {
    child: Child,
    pgid: Option<Pid>,
    /// A container's name, to stop it through the runtime.
    container: Option<(String, String)>,
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
    dirs: &WorkloadDirs,
    inside: Option<&Path>,
) -> Vec<(String, String)> {
    let path = |p: &Path, name: &str| match inside {
        Some(root) => root.join(name).display().to_string(),
        None => p.display().to_string(),
    };
    let hostfile = dirs.root.join("hostfile");
    let slots = spec.resources.gpus.max(1);
    let _ = std::fs::write(&hostfile, format!("localhost slots={slots}\n"));
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend([
        ("RESPAWN_JOB_ID".into(), args.job.to_string()),
        ("RESPAWN_ATTEMPT".into(), args.attempt.to_string()),
        ("RESPAWN_VM".into(), args.vm.clone()),
        (
            "RESPAWN_CHECKPOINT_DIR".into(),
            path(&dirs.checkpoints, "checkpoints"),
        ),
        ("RESPAWN_INPUT_DIR".into(), path(&dirs.inputs, "input")),
        ("RESPAWN_OUTPUT_DIR".into(), path(&dirs.outputs, "output")),
        ("RESPAWN_GRACE_SECONDS".into(), args.grace_secs.to_string()),
        ("RESPAWN_NUM_NODES".into(), "1".into()),
        ("RESPAWN_NODE_RANK".into(), "0".into()),
        ("RESPAWN_MASTER_ADDR".into(), "127.0.0.1".into()),
        ("RESPAWN_MASTER_PORT".into(), "29500".into()),
        ("RESPAWN_HOSTFILE".into(), path(&hostfile, "hostfile")),
    ]);
    // A sweep's job learns its index here: the sweep cannot put it in `env`, where
    // RESPAWN_ names are reserved. Digits only, since anyone may set the label.
    if let Some(index) = spec.labels.get(respawn_core::sweep::INDEX_LABEL)
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
    {
        env.push(("RESPAWN_ARRAY_INDEX".into(), index.clone()));
    }
    env
}

impl Workload {
    pub fn spawn(
        spec: &JobSpec,
        secrets: &BTreeMap<String, String>,
        args: &Args,
        dirs: &WorkloadDirs,
    ) -> Result<Self, Error> {
        let (mut cmd, container) = match &spec.image {
            Some(image) => {
                let rt = args
                    .container_runtime
                    .clone()
                    .ok_or_else(|| Error::NoRuntime {
                        image: image.clone(),
                    })?;
                let name = format!("respawn-{}", args.vm);
                (
                    container_command(&rt, &name, image, spec, secrets, args, dirs),
                    Some((rt, name)),
                )
            }
            None => {
                let argv = spec.argv();
                let (program, rest) = argv.split_first().ok_or(Error::NoCommand)?;
                let mut cmd = Command::new(program);
                cmd.args(rest)
                    .envs(contract_env(spec, args, dirs, None))
                    .envs(secrets);
                cmd.current_dir(
                    spec.working_dir
                        .as_deref()
                        .map_or(dirs.root.clone(), PathBuf::from),
                );
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
            let _ = std::fs::write(args.vm_dir.join("workload.pgid"), id.to_string());
        }
        Ok(Workload {
            child,
            pgid,
            container,
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
                .args(["kill", "--signal", "TERM", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        } else if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGTERM);
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

/// Secrets reach the container through the environment of `docker run` (`-e NAME`
/// without a value), never its command line, where `ps` would show them.
fn container_command(
    rt: &str,
    name: &str,
    image: &str,
    spec: &JobSpec,
    secrets: &BTreeMap<String, String>,
    args: &Args,
    dirs: &WorkloadDirs,
) -> Command {
    let inside = Path::new("/respawn");
    let mut cmd = Command::new(rt);
    cmd.args(["run", "--rm", "--name", name]);
    for (host, guest) in [
        (&dirs.checkpoints, "checkpoints"),
        (&dirs.inputs, "input"),
        (&dirs.outputs, "output"),
    ] {
        cmd.arg("-v").arg(format!(
            "{}:{}",
            host.display(),
            inside.join(guest).display()
        ));
    }
    cmd.arg("-v").arg(format!(
        "{}:{}",
        dirs.root.join("hostfile").display(),
        inside.join("hostfile").display()
    ));
    for (k, v) in contract_env(spec, args, dirs, Some(inside)) {
        cmd.arg("-e").arg(format!("{k}={v}"));
    }
    if let Ok(gpus) = std::env::var("CUDA_VISIBLE_DEVICES")
        && spec.resources.gpus > 0
    {
        cmd.arg("--gpus").arg(format!("\"device={gpus}\""));
    }
    for (k, v) in secrets {
        cmd.arg("-e").arg(k).env(k, v);
    }
    if let Some(wd) = &spec.working_dir {
        cmd.args(["-w", wd]);
    }
    cmd.arg(image);
    cmd.args(spec.argv());
    cmd
}
